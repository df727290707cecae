//! The lookup structure the request path reads, and the entries behind it.
//!
//! [`Index`] is immutable once published: writers clone it (O(1): persistent
//! `imbl` maps share every node), change the clone (O(log n) per entry) and
//! publish it. [`Entries`] is the writers' side: every entry by its line and in
//! expiry order, so that a sweep visits only the expired ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Revocation, Revoked, Target};
use crate::authn::VerifiedToken;

/// A key of the index: shared, so that copying an index node (persistent maps
/// copy the nodes on the path they change) costs a reference count, not an
/// allocation.
pub(super) type Key = Arc<str>;

/// The values of one key: a multiset, since two entries may match the same
/// key. Almost every key has one value, kept inline so that copying an index
/// node touches no other memory for it; more are shared between snapshots
/// until a writer changes that key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Values<T> {
    One(T),
    Many(Arc<Vec<T>>),
}

impl<T: Clone> Values<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Values::One(value) => std::slice::from_ref(value),
            Values::Many(values) => values,
        }
    }

    /// Inserts `value` at `at` (0..=len).
    fn insert(&mut self, at: usize, value: T) {
        let mut values = match self {
            Values::One(one) => vec![one.clone()],
            Values::Many(many) => std::mem::take(Arc::make_mut(many)),
        };
        values.insert(at, value);
        *self = Values::Many(Arc::new(values));
    }

    /// Removes the value at `at` of two or more.
    pub(super) fn remove(&mut self, at: usize) {
        if let Values::Many(many) = self {
            let values = Arc::make_mut(many);
            values.remove(at);
            if let [one] = values.as_slice() {
                *self = Values::One(one.clone());
            }
        }
    }
}

/// A persistent map: cloning it is O(1) and an insert or removal copies only
/// the O(log n) nodes on its path, sharing the rest with the older snapshots.
type Map<T> = imbl::HashMap<Key, Values<T>>;

/// The immutable lookup structure the request path reads.
///
/// Writers never rebuild it: they clone the published index (O(1)), apply their
/// changes to the clone ([`Index::add`], [`Index::remove`], O(log n) each) and
/// publish the clone.
#[derive(Debug, Default, Clone)]
pub(super) struct Index {
    /// jti → (issuer or any, expiry).
    jti: Map<(Option<Key>, i64)>,
    /// sub → (cut-off, expiry).
    sub: Map<(i64, i64)>,
    /// kid → (cut-off or every token, expiry).
    kid: Map<(Option<i64>, i64)>,
    /// client id → (cut-off or every token, expiry).
    client: Map<(Option<i64>, i64)>,
    /// iss → (cut-off, expiry).
    iss: Map<(i64, i64)>,
    /// API key id → expiries, ascending.
    api_key: Map<i64>,
    /// Earliest expiry, for the sweeper. [`Index::add`] keeps it; after a
    /// removal the writer sets it from its expiry order.
    pub(super) next_expiry: Option<i64>,
}

/// Adds `value` to the values of `key`.
fn push_value<T: Clone>(map: &mut Map<T>, key: &str, value: T) {
    match map.get_mut(key) {
        Some(values) => values.insert(values.as_slice().len(), value),
        None => {
            map.insert(Key::from(key), Values::One(value));
        }
    }
}

/// Adds `exp` to the ascending expiries of `key`.
fn push_expiry(map: &mut Map<i64>, key: &str, exp: i64) {
    match map.get_mut(key) {
        Some(values) => values.insert(values.as_slice().partition_point(|e| *e <= exp), exp),
        None => {
            map.insert(Key::from(key), Values::One(exp));
        }
    }
}

/// Removes one occurrence of a value of `key` matching `is`, and the key with
/// its last value. The order of the others is kept (the expiries stay sorted).
fn remove_value<T: Clone>(map: &mut Map<T>, key: &str, is: impl Fn(&T) -> bool) {
    let Some(values) = map.get(key) else { return };
    let values = values.as_slice();
    let Some(at) = values.iter().position(is) else {
        return;
    };
    if values.len() == 1 {
        map.remove(key);
    } else if let Some(values) = map.get_mut(key) {
        values.remove(at);
    }
}

impl Index {
    /// An index of `entries`, built by adding them one by one.
    #[cfg(test)]
    pub(super) fn build<'a>(entries: impl Iterator<Item = &'a Revocation>) -> Index {
        let mut index = Index::default();
        for entry in entries {
            index.add(entry);
        }
        index
    }

    /// Adds `entry`: O(log n).
    pub(super) fn add(&mut self, entry: &Revocation) {
        let exp = entry.expires_at;
        self.next_expiry = Some(self.next_expiry.map_or(exp, |n| n.min(exp)));
        match &entry.target {
            Target::Token { jti, issuer } => {
                push_value(&mut self.jti, jti, (issuer.as_deref().map(Key::from), exp))
            }
            Target::Subject { sub, issued_before } => {
                push_value(&mut self.sub, sub, (*issued_before, exp))
            }
            Target::Key { kid, issued_before } => {
                push_value(&mut self.kid, kid, (*issued_before, exp))
            }
            Target::Client {
                client_id,
                issued_before,
            } => push_value(&mut self.client, client_id, (*issued_before, exp)),
            Target::Issuer {
                issuer,
                issued_before,
            } => push_value(&mut self.iss, issuer, (*issued_before, exp)),
            Target::ApiKey { api_key_id } => push_expiry(&mut self.api_key, api_key_id, exp),
        }
    }

    /// Removes one occurrence of what [`Index::add`] added for `entry`:
    /// O(log n). Leaves `next_expiry` to the caller.
    pub(super) fn remove(&mut self, entry: &Revocation) {
        let exp = entry.expires_at;
        match &entry.target {
            Target::Token { jti, issuer } => remove_value(&mut self.jti, jti, |(i, e)| {
                *e == exp && i.as_deref() == issuer.as_deref()
            }),
            Target::Subject { sub, issued_before } => {
                remove_value(&mut self.sub, sub, |(cutoff, e)| {
                    *e == exp && cutoff == issued_before
                })
            }
            Target::Key { kid, issued_before } => {
                remove_value(&mut self.kid, kid, |(cutoff, e)| {
                    *e == exp && cutoff == issued_before
                })
            }
            Target::Client {
                client_id,
                issued_before,
            } => remove_value(&mut self.client, client_id, |(cutoff, e)| {
                *e == exp && cutoff == issued_before
            }),
            Target::Issuer {
                issuer,
                issued_before,
            } => remove_value(&mut self.iss, issuer, |(cutoff, e)| {
                *e == exp && cutoff == issued_before
            }),
            Target::ApiKey { api_key_id } => {
                remove_value(&mut self.api_key, api_key_id, |e| *e == exp)
            }
        }
    }

    pub(super) fn check(&self, token: &VerifiedToken, now: i64) -> Result<(), Revoked> {
        let live = |exp: &i64| *exp > now;
        let latest_live = |expiries: &Values<i64>| expiries.as_slice().last().is_some_and(live);
        if let Some(jti) = &token.jti
            && let Some(rules) = self.jti.get(jti.as_str())
            && rules.as_slice().iter().any(|(issuer, exp)| {
                live(exp) && issuer.as_deref().is_none_or(|iss| iss == token.issuer)
            })
        {
            return Err(Revoked { kind: "jti" });
        }
        if let Some(rules) = self.sub.get(token.subject.as_str())
            && rules
                .as_slice()
                .iter()
                .any(|(cutoff, exp)| live(exp) && token.issued_at <= *cutoff)
        {
            return Err(Revoked { kind: "sub" });
        }
        // A cut-off matches tokens issued at or before it; none, every token.
        let covers = |rules: &Values<(Option<i64>, i64)>| {
            rules.as_slice().iter().any(|(cutoff, exp)| {
                live(exp) && cutoff.is_none_or(|cutoff| token.issued_at <= cutoff)
            })
        };
        if let Some(rules) = self.iss.get(token.issuer.as_str())
            && rules
                .as_slice()
                .iter()
                .any(|(cutoff, exp)| live(exp) && token.issued_at <= *cutoff)
        {
            return Err(Revoked { kind: "iss" });
        }
        if !token.key_id.is_empty() && self.kid.get(token.key_id.as_str()).is_some_and(covers) {
            return Err(Revoked { kind: "kid" });
        }
        if let Some(client) = &token.client_id
            && self.client.get(client.as_str()).is_some_and(covers)
        {
            return Err(Revoked { kind: "client" });
        }
        if let Some(id) = &token.api_key_id
            && self.api_key.get(id.as_str()).is_some_and(latest_live)
        {
            return Err(Revoked { kind: "api_key" });
        }
        Ok(())
    }
}

/// The mutable side: every entry by its line, and the lines in expiry order,
/// behind a lock writers take.
#[derive(Debug, Default)]
pub(super) struct Entries {
    pub(super) by_line: HashMap<Key, Revocation>,
    /// Every entry's line by (expiry, order of arrival): the sweep takes the
    /// expired ones from the front, without visiting the others. Keys of two
    /// integers, so that ordering them never reads a line.
    pub(super) by_expiry: BTreeMap<(i64, u64), Key>,
    /// The order of arrival of the next entry.
    next_seq: u64,
}

impl Entries {
    pub(super) fn len(&self) -> usize {
        self.by_line.len()
    }

    pub(super) fn contains(&self, line: &str) -> bool {
        self.by_line.contains_key(line)
    }

    /// Adds `entry` here and to `index` unless its line is known; true if it
    /// was new. O(log n).
    pub(super) fn add(&mut self, index: &mut Index, line: &str, entry: Revocation) -> bool {
        if self.by_line.contains_key(line) {
            return false;
        }
        let line = Key::from(line);
        index.add(&entry);
        self.by_expiry
            .insert((entry.expires_at, self.next_seq), line.clone());
        self.next_seq += 1;
        self.by_line.insert(line, entry);
        true
    }

    /// Removes the entries expired at `now` here and from `index`; returns how
    /// many. O(log n) per entry removed; nothing else is visited.
    pub(super) fn sweep(&mut self, index: &mut Index, now: i64) -> usize {
        let mut removed = 0;
        while let Some(((exp, _), _)) = self.by_expiry.first_key_value()
            && *exp <= now
        {
            let Some((_, line)) = self.by_expiry.pop_first() else {
                break;
            };
            if let Some(entry) = self.by_line.remove(&line) {
                index.remove(&entry);
                removed += 1;
            }
        }
        index.next_expiry = self.next_expiry();
        removed
    }

    /// Entries in force at `now`: all but those expired and not swept yet
    /// (visits only these).
    pub(super) fn in_force(&self, now: i64) -> usize {
        let expired = self.by_expiry.range(..(now.saturating_add(1), 0)).count();
        self.len() - expired
    }

    pub(super) fn next_expiry(&self) -> Option<i64> {
        self.by_expiry.first_key_value().map(|((exp, _), _)| *exp)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    pub(super) fn check(
        targets: Vec<Target>,
        token: &VerifiedToken,
        now: i64,
    ) -> Result<(), Revoked> {
        let entries: Vec<Revocation> = targets.into_iter().map(entry).collect();
        Index::build(entries.iter()).check(token, now)
    }

    #[test]
    fn each_kind_matches_only_its_credential() {
        let t = token();
        assert_eq!(check(vec![], &t, 1100), Ok(()));
        let jti = |issuer: Option<&str>| Target::Token {
            jti: "j1".into(),
            issuer: issuer.map(Into::into),
        };
        assert_eq!(check(vec![jti(None)], &t, 1100).unwrap_err().kind, "jti");
        assert!(check(vec![jti(Some("https://iss"))], &t, 1100).is_err());
        assert!(check(vec![jti(Some("https://other"))], &t, 1100).is_ok());
        let sub = |cutoff| Target::Subject {
            sub: "alice".into(),
            issued_before: cutoff,
        };
        assert_eq!(check(vec![sub(1000)], &t, 1100).unwrap_err().kind, "sub");
        assert!(
            check(vec![sub(999)], &t, 1100).is_ok(),
            "issued after the cut-off"
        );
        let kid = Target::Key {
            kid: "k1".into(),
            issued_before: None,
        };
        assert_eq!(check(vec![kid], &t, 1100).unwrap_err().kind, "kid");
        let client = Target::Client {
            client_id: "web".into(),
            issued_before: None,
        };
        assert_eq!(check(vec![client], &t, 1100).unwrap_err().kind, "client");
        let api = Target::ApiKey {
            api_key_id: "ak1".into(),
        };
        assert!(check(vec![api.clone()], &t, 1100).is_ok());
        let mut keyed = t.clone();
        keyed.api_key_id = Some("ak1".into());
        assert_eq!(check(vec![api], &keyed, 1100).unwrap_err().kind, "api_key");
        // Expired entries no longer match.
        assert!(check(vec![jti(None)], &t, 5000).is_ok());
    }

    /// The test oracle: every entry looked at in turn, in the order of the
    /// kinds the index checks.
    fn naive_check<'a>(
        entries: impl Iterator<Item = &'a Revocation> + Clone,
        token: &VerifiedToken,
        now: i64,
    ) -> Result<(), Revoked> {
        let hit = |kind: &str| {
            entries.clone().any(|e| {
                e.expires_at > now
                    && e.target.kind() == kind
                    && match &e.target {
                        Target::Token { jti, issuer } => {
                            token.jti.as_deref() == Some(jti.as_str())
                                && issuer.as_deref().is_none_or(|i| i == token.issuer)
                        }
                        Target::Subject { sub, issued_before } => {
                            *sub == token.subject && token.issued_at <= *issued_before
                        }
                        Target::Key { kid, issued_before } => {
                            !token.key_id.is_empty()
                                && *kid == token.key_id
                                && issued_before.is_none_or(|c| token.issued_at <= c)
                        }
                        Target::Client {
                            client_id,
                            issued_before,
                        } => {
                            token.client_id.as_deref() == Some(client_id.as_str())
                                && issued_before.is_none_or(|c| token.issued_at <= c)
                        }
                        Target::Issuer {
                            issuer,
                            issued_before,
                        } => *issuer == token.issuer && token.issued_at <= *issued_before,
                        Target::ApiKey { api_key_id } => {
                            token.api_key_id.as_deref() == Some(api_key_id.as_str())
                        }
                    }
            })
        };
        for kind in ["jti", "sub", "iss", "kid", "client", "api_key"] {
            if hit(kind) {
                return Err(Revoked {
                    kind: match kind {
                        "jti" => "jti",
                        "sub" => "sub",
                        "iss" => "iss",
                        "kid" => "kid",
                        "client" => "client",
                        _ => "api_key",
                    },
                });
            }
        }
        Ok(())
    }

    /// A small deterministic generator (xorshift64*), so that a failure
    /// reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len() as u64) as usize]
        }
    }

    const JTIS: [&str; 4] = ["j0", "j1", "j2", "j3"];
    const ISSUERS: [&str; 2] = ["https://a", "https://b"];
    const SUBS: [&str; 3] = ["s0", "s1", "s2"];
    const IDS: [&str; 3] = ["x0", "x1", "x2"];

    /// Few keys and close expiries, so that entries share keys and expiries.
    fn random_entry(rng: &mut Rng, now: i64) -> Revocation {
        let target = match rng.below(7) {
            0 | 1 => Target::Token {
                jti: rng.pick(&JTIS).into(),
                issuer: match rng.below(3) {
                    0 => None,
                    _ => Some(rng.pick(&ISSUERS).into()),
                },
            },
            2 => Target::Subject {
                sub: rng.pick(&SUBS).into(),
                issued_before: 1000 + rng.below(4) as i64 * 10,
            },
            3 => Target::Key {
                kid: rng.pick(&IDS).into(),
                issued_before: match rng.below(2) {
                    0 => None,
                    _ => Some(1000 + rng.below(4) as i64 * 10),
                },
            },
            4 => Target::Client {
                client_id: rng.pick(&IDS).into(),
                issued_before: match rng.below(2) {
                    0 => None,
                    _ => Some(1000 + rng.below(4) as i64 * 10),
                },
            },
            5 => Target::Issuer {
                issuer: rng.pick(&ISSUERS).into(),
                issued_before: 1000 + rng.below(4) as i64 * 10,
            },
            _ => Target::ApiKey {
                api_key_id: rng.pick(&IDS).into(),
            },
        };
        Revocation {
            target,
            created_at: now,
            expires_at: now + 1 + rng.below(20) as i64,
            reason: format!("r{}", rng.below(3)),
        }
    }

    /// Every combination of the keys above, for the probes.
    fn probe_tokens() -> Vec<VerifiedToken> {
        let mut tokens = Vec::new();
        for jti in [None, Some("j0"), Some("j1"), Some("j3")] {
            for issuer in ISSUERS {
                for (sub, iat) in [("s0", 1000), ("s1", 1015), ("s2", 1030), ("s0", 1031)] {
                    for id in ["x0", "x1", "x2", "none"] {
                        let mut t = token();
                        t.jti = jti.map(Into::into);
                        t.issuer = issuer.into();
                        t.subject = sub.into();
                        t.issued_at = iat;
                        t.key_id = if id == "x2" { String::new() } else { id.into() };
                        t.client_id = (id != "x0").then(|| id.into());
                        t.api_key_id = (id != "x1").then(|| id.into());
                        tokens.push(t);
                    }
                }
            }
        }
        tokens
    }

    fn assert_same_as_oracles(entries: &Entries, index: &Index, now: i64, step: usize) {
        let rebuilt = Index::build(entries.by_line.values());
        assert_eq!(
            index.next_expiry,
            entries.by_line.values().map(|e| e.expires_at).min(),
            "next_expiry, step {step}"
        );
        assert_eq!(entries.by_expiry.len(), entries.by_line.len());
        for token in probe_tokens() {
            for at in [now, now + 1, now + 5, now + 12, now + 25] {
                let expected = naive_check(entries.by_line.values(), &token, at);
                assert_eq!(
                    index.check(&token, at),
                    expected,
                    "incremental index vs linear check, step {step}, at {at}, {token:?}"
                );
                assert_eq!(
                    rebuilt.check(&token, at),
                    expected,
                    "rebuilt index vs linear check, step {step}"
                );
            }
        }
    }

    /// The incremental index answers every check as a linear scan of the
    /// entries (and a full rebuild) does, over random inserts and sweeps; an
    /// older snapshot keeps answering as it did when it was published.
    #[test]
    fn the_incremental_index_matches_a_full_rebuild_over_random_inserts_and_sweeps() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut entries = Entries::default();
        let mut index = Index::default();
        let mut now = 10_000;
        let mut kept: Option<(Index, Vec<Revocation>, i64)> = None;
        for step in 0..400 {
            match rng.below(10) {
                // A batch of inserts on one copy (as from Redis).
                0..=5 => {
                    let mut next = index.clone();
                    for _ in 0..1 + rng.below(4) {
                        let entry = random_entry(&mut rng, now);
                        entries.add(&mut next, &entry.to_line(), entry);
                    }
                    index = next;
                }
                // Time passes and the sweeper runs.
                6..=8 => {
                    now += rng.below(6) as i64;
                    let mut next = index.clone();
                    let before = entries.len();
                    let removed = entries.sweep(&mut next, now);
                    assert_eq!(before - removed, entries.len());
                    assert!(entries.by_line.values().all(|e| e.expires_at > now));
                    index = next;
                }
                // A line already known changes nothing.
                _ => {
                    if let Some(entry) = entries.by_line.values().next().cloned() {
                        let mut next = index.clone();
                        assert!(!entries.add(&mut next, &entry.to_line(), entry));
                        index = next;
                    }
                }
            }
            assert_same_as_oracles(&entries, &index, now, step);
            if step % 50 == 0 {
                if let Some((old, old_entries, at)) = &kept {
                    for token in probe_tokens() {
                        assert_eq!(
                            old.check(&token, *at),
                            naive_check(old_entries.iter(), &token, *at),
                            "an older snapshot changed"
                        );
                    }
                }
                kept = Some((
                    index.clone(),
                    entries.by_line.values().cloned().collect(),
                    now,
                ));
            }
        }
        // Everything expires: the index is empty again.
        entries.sweep(&mut index, i64::MAX);
        assert!(entries.by_line.is_empty() && entries.by_expiry.is_empty());
        assert!(index.jti.is_empty() && index.sub.is_empty());
        assert!(index.kid.is_empty() && index.client.is_empty() && index.api_key.is_empty());
        assert_eq!(index.next_expiry, None);
    }

    fn at(target: Target, expires_at: i64) -> Revocation {
        Revocation {
            target,
            created_at: 1000,
            expires_at,
            reason: String::new(),
        }
    }

    fn add_all(entries: &mut Entries, index: &mut Index, all: &[Revocation]) {
        for entry in all {
            assert!(entries.add(index, &entry.to_line(), entry.clone()));
        }
    }

    /// Sweeping one of two entries of the same `jti` (different issuers)
    /// removes just that one.
    #[test]
    fn sweeping_one_of_two_jti_entries_keeps_the_other_issuer() {
        let jti = |issuer: &str| Target::Token {
            jti: "j1".into(),
            issuer: Some(issuer.into()),
        };
        let (mut entries, mut index) = (Entries::default(), Index::default());
        add_all(
            &mut entries,
            &mut index,
            &[at(jti("https://a"), 2000), at(jti("https://b"), 3000)],
        );
        let before = index.clone();
        assert_eq!(entries.sweep(&mut index, 2000), 1);
        assert_eq!(
            index.jti.get("j1").map(|v| v.as_slice()),
            Some(&[(Some(Key::from("https://b")), 3000)][..])
        );
        assert_eq!(index.next_expiry, Some(3000));
        let mut t = token();
        t.issuer = "https://a".into();
        assert_eq!(index.check(&t, 1500), Ok(()), "removed");
        assert!(
            before.check(&t, 1500).is_err(),
            "the older snapshot kept it"
        );
        t.issuer = "https://b".into();
        assert_eq!(index.check(&t, 2500).unwrap_err().kind, "jti");
        assert_eq!(entries.sweep(&mut index, 3000), 1);
        assert!(index.jti.is_empty());
    }

    /// Two cut-offs for one subject, the later cut-off expiring first: after
    /// it is swept, the earlier one still applies.
    #[test]
    fn a_subject_keeps_its_earlier_cutoff_when_the_later_one_expires_first() {
        let sub = |cutoff| Target::Subject {
            sub: "alice".into(),
            issued_before: cutoff,
        };
        let (mut entries, mut index) = (Entries::default(), Index::default());
        add_all(
            &mut entries,
            &mut index,
            &[at(sub(1000), 5000), at(sub(2000), 3000)],
        );
        let mut t = token();
        t.issued_at = 1500;
        assert_eq!(index.check(&t, 2500).unwrap_err().kind, "sub");
        assert_eq!(entries.sweep(&mut index, 3000), 1);
        assert_eq!(
            index.sub.get("alice").map(|v| v.as_slice()),
            Some(&[(1000, 5000)][..])
        );
        assert_eq!(index.next_expiry, Some(5000));
        assert_eq!(index.check(&t, 2500), Ok(()), "the 2000 cut-off is gone");
        t.issued_at = 900;
        assert_eq!(index.check(&t, 3500).unwrap_err().kind, "sub");
        assert_eq!(entries.sweep(&mut index, 5000), 1);
        assert!(index.sub.is_empty());
        assert_eq!(index.next_expiry, None);
    }

    /// A key revoked again with a later expiry stays revoked when the first
    /// entry expires; and the same for clients and API keys.
    #[test]
    fn a_key_revoked_again_stays_revoked_when_the_earlier_entry_expires() {
        for target in [
            kid("k1"),
            Target::Client {
                client_id: "web".into(),
                issued_before: None,
            },
            Target::ApiKey {
                api_key_id: "ak1".into(),
            },
        ] {
            let (mut entries, mut index) = (Entries::default(), Index::default());
            add_all(
                &mut entries,
                &mut index,
                &[at(target.clone(), 5000), at(target.clone(), 3000)],
            );
            let mut t = token();
            t.api_key_id = Some("ak1".into());
            let kind = target.kind();
            // The expiries of the one key's entries.
            let map = |index: &Index| -> Map<i64> {
                let strip = |map: &Map<(Option<i64>, i64)>| {
                    map.iter()
                        .map(|(k, v)| {
                            let mut exps: Vec<i64> = v.as_slice().iter().map(|(_, e)| *e).collect();
                            exps.sort_unstable();
                            let values = match exps.as_slice() {
                                [one] => Values::One(*one),
                                _ => Values::Many(Arc::new(exps)),
                            };
                            (k.clone(), values)
                        })
                        .collect()
                };
                match kind {
                    "kid" => strip(&index.kid),
                    "client" => strip(&index.client),
                    _ => index.api_key.clone(),
                }
            };
            assert_eq!(
                map(&index).values().next().map(|v| v.as_slice().to_vec()),
                Some(vec![3000, 5000])
            );
            assert_eq!(entries.sweep(&mut index, 3000), 1);
            assert_eq!(
                map(&index).values().next().map(|v| v.as_slice().to_vec()),
                Some(vec![5000])
            );
            assert_eq!(index.check(&t, 3500).unwrap_err().kind, kind);
            assert_eq!(entries.sweep(&mut index, 5000), 1);
            assert!(map(&index).is_empty());
            assert_eq!(index.check(&t, 3500), Ok(()));
        }
    }

    /// The same line twice (a duplicate) and two lines with the same target
    /// and expiry (different reasons): a sweep removes each occurrence once.
    #[test]
    fn equal_entries_under_different_lines_are_counted_apart() {
        let (mut entries, mut index) = (Entries::default(), Index::default());
        let first = at(kid("k1"), 3000);
        let mut second = first.clone();
        second.reason = "again".into();
        assert!(entries.add(&mut index, &first.to_line(), first.clone()));
        assert!(!entries.add(&mut index, &first.to_line(), first.clone()));
        assert!(entries.add(&mut index, &second.to_line(), second));
        assert_eq!(
            index.kid.get("k1").map(|v| v.as_slice().to_vec()),
            Some(vec![(None, 3000), (None, 3000)])
        );
        assert_eq!(entries.in_force(2999), 2);
        assert_eq!(entries.in_force(3000), 0);
        assert_eq!(entries.sweep(&mut index, 3000), 2);
        assert!(index.kid.is_empty());
    }
}
