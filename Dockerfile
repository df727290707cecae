# Portcullis container image (deploy/kubernetes/deployment.yaml runs it as
# user 65532 with a read-only root filesystem).
#   docker build -t registry.example.com/portcullis:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
# System roots for remote JWKS, OIDC discovery, introspection and rediss://.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER 65532:65532
EXPOSE 9191
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve", "--config", "/etc/portcullis/config/portcullis.toml"]
