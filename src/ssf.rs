//! OpenID Shared Signals receiver: Security Event Tokens (CAEP, RISC) pushed
//! (RFC 8935) or polled (RFC 8936) from one transmitter become revocations.
//! (Being written.)
