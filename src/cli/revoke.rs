//! `revoke` (one target, or a `--from-file` list of them) and `revocations`:
//! the target list format, cut-off times, and how a target is shown.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, bail};

use super::admin_client::{admin_client, admin_error};
use super::{AdminArgs, RevokeArgs};
use crate::admin::pb;

fn rfc3339(secs: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn parse_cutoff(text: &str) -> anyhow::Result<Option<i64>> {
    if text.eq_ignore_ascii_case("now") {
        return Ok(None);
    }
    let time = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--before must be RFC 3339 (e.g. 2026-11-29T10:00:00Z) or now, found {text:?}")
    })?;
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Ok(Some(secs))
}

/// `"id" (issued at or before <time>)`, or `"id"` without a cut-off.
fn cutoff_described(id: &str, issued_before: Option<i64>) -> String {
    match issued_before {
        Some(cutoff) => format!("{id:?} (issued at or before {})", rfc3339(cutoff)),
        None => format!("{id:?}"),
    }
}

/// A cut-off given as RFC 3339 or `now`, in seconds since the epoch.
fn cutoff_or_now(text: &str) -> anyhow::Result<i64> {
    Ok(parse_cutoff(text)?.unwrap_or_else(crate::revocation::unix_now))
}

fn describe_target(target: Option<&pb::Target>) -> (&'static str, String) {
    use pb::target::Kind;
    match target.and_then(|t| t.kind.as_ref()) {
        Some(Kind::Token(t)) if t.issuer.is_empty() => ("jti", format!("{:?} (any issuer)", t.jti)),
        Some(Kind::Token(t)) => ("jti", format!("{:?} (issuer {:?})", t.jti, t.issuer)),
        Some(Kind::Subject(s)) => (
            "sub",
            format!(
                "{:?} (issued at or before {})",
                s.sub,
                rfc3339(s.issued_before.unwrap_or_default())
            ),
        ),
        Some(Kind::KeyId(kid)) => ("kid", format!("{kid:?}")),
        Some(Kind::ClientId(client)) => ("client", format!("{client:?}")),
        Some(Kind::Key(k)) => ("kid", cutoff_described(&k.kid, k.issued_before)),
        Some(Kind::Client(c)) => ("client", cutoff_described(&c.client_id, c.issued_before)),
        Some(Kind::Issuer(i)) => ("iss", cutoff_described(&i.issuer, i.issued_before)),
        Some(Kind::ApiKeyId(id)) => ("api_key", format!("{id:?}")),
        None => ("?", String::new()),
    }
}

/// Targets per `RevokeBatch` call sent by `revoke --from-file`.
pub const REVOKE_BATCH_SIZE: usize = 1000;

/// One target of a `--from-file` list, with its line number (from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedTarget {
    /// The line it was read from.
    pub line: usize,
    /// The target.
    pub target: pb::Target,
}

/// Parses a `--from-file` list: one target per line, `#` comments and blank
/// lines ignored. Returns every target, or a message for every bad line
/// (`line N: ...`), which names the problem, never an identifier's value.
pub fn parse_target_list(text: &str) -> Result<Vec<ListedTarget>, Vec<String>> {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = strip_comment(raw).trim();
        if content.is_empty() {
            continue;
        }
        match parse_target_line(content) {
            Ok(kind) => targets.push(ListedTarget {
                line,
                target: pb::Target { kind: Some(kind) },
            }),
            Err(message) => errors.push(format!("line {line}: {message}")),
        }
    }
    if errors.is_empty() {
        Ok(targets)
    } else {
        Err(errors)
    }
}

/// `line` up to its comment: a `#` at its start or after a space or tab (an
/// identifier may contain `#`).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let at = (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()));
    at.map_or(line, |i| &line[..i])
}

/// One line of a `--from-file` list (comment and blanks removed).
fn parse_target_line(content: &str) -> Result<pb::target::Kind, String> {
    use pb::target::Kind;
    let mut words = content.split_whitespace();
    let kind = words.next().unwrap_or_default();
    let allowed: &[&str] = match kind {
        "jti" => &["issuer", "exp"],
        "sub" | "kid" | "client" | "issuer" => &["before"],
        "api_key" => &[],
        _ => {
            return Err(
                "unknown target kind: expected jti, sub, kid, client, issuer or api_key first"
                    .into(),
            );
        }
    };
    let id = words
        .next()
        .filter(|id| !id.contains('='))
        .ok_or_else(|| format!("{kind} needs an identifier after it"))?;
    if id.len() > crate::revocation::MAX_ID_BYTES {
        return Err(format!(
            "the {kind} is longer than {} bytes",
            crate::revocation::MAX_ID_BYTES
        ));
    }
    let mut options: Vec<(&str, &str)> = Vec::new();
    for word in words {
        let Some((name, value)) = word.split_once('=') else {
            return Err(format!(
                "unexpected word after the {kind} (identifiers cannot contain spaces; options are name=value)"
            ));
        };
        if !allowed.contains(&name) {
            return Err(if allowed.is_empty() {
                format!("{kind} takes no option")
            } else {
                format!(
                    "unknown option for {kind}: expected {}",
                    allowed.join("=, ") + "="
                )
            });
        }
        if options.iter().any(|(n, _)| *n == name) {
            return Err(format!("{name}= given twice"));
        }
        if value.is_empty() {
            return Err(format!("{name}= needs a value"));
        }
        options.push((name, value));
    }
    let option = |name: &str| options.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    // `before=`: absent, `now` (None: the server's now) or a time.
    let before = |text: Option<&str>| match text {
        None => Ok(None),
        Some(text) => parse_cutoff(text)
            .map_err(|_| "before= must be RFC 3339 (e.g. 2026-11-29T10:00:00Z) or now".to_owned()),
    };
    Ok(match kind {
        "jti" => {
            let issuer = option("issuer").unwrap_or_default();
            if issuer.len() > crate::revocation::MAX_ID_BYTES {
                return Err(format!(
                    "the issuer is longer than {} bytes",
                    crate::revocation::MAX_ID_BYTES
                ));
            }
            let expires_at = option("exp")
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| "exp= must be seconds since the epoch".to_owned())
                })
                .transpose()?;
            Kind::Token(pb::TokenTarget {
                jti: id.to_owned(),
                issuer: issuer.to_owned(),
                expires_at,
            })
        }
        "sub" => Kind::Subject(pb::SubjectTarget {
            sub: id.to_owned(),
            issued_before: before(option("before"))?,
        }),
        "kid" => match before(option("before"))? {
            None if option("before").is_none() => Kind::KeyId(id.to_owned()),
            cutoff => Kind::Key(pb::KeyTarget {
                kid: id.to_owned(),
                issued_before: Some(cutoff.unwrap_or_else(crate::revocation::unix_now)),
            }),
        },
        "client" => match before(option("before"))? {
            None if option("before").is_none() => Kind::ClientId(id.to_owned()),
            cutoff => Kind::Client(pb::ClientTarget {
                client_id: id.to_owned(),
                issued_before: Some(cutoff.unwrap_or_else(crate::revocation::unix_now)),
            }),
        },
        "issuer" => Kind::Issuer(pb::IssuerTarget {
            issuer: id.to_owned(),
            issued_before: before(option("before"))?,
        }),
        _ => Kind::ApiKeyId(id.to_owned()),
    })
}

/// `revoke --from-file`: the whole list checked first, then sent in batches.
async fn revoke_from_file(
    admin: &AdminArgs,
    path: &Path,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let (name, text) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the target list from standard input")?;
        ("standard input".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        (path.display().to_string(), text)
    };
    let targets = match parse_target_list(&text) {
        Ok(targets) => targets,
        Err(errors) => {
            for error in &errors {
                eprintln!("{name}: {error}");
            }
            bail!("{name}: {} bad line(s); nothing was revoked", errors.len());
        }
    };
    if targets.is_empty() {
        bail!("{name} lists no target; nothing was revoked");
    }
    let total = targets.len();
    let mut client = admin_client(admin)
        .await?
        .max_decoding_message_size(crate::admin::MAX_ADMIN_MESSAGE_BYTES);
    let (mut revoked, mut synced, mut queued) = (0usize, 0u64, 0u64);
    for batch in targets.chunks(REVOKE_BATCH_SIZE) {
        let request = pb::RevokeBatchRequest {
            targets: batch.iter().map(|t| t.target.clone()).collect(),
            reason: reason.clone(),
        };
        let response = match client.revoke_batch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let line = batch_error_line(&status, batch)
                    .map(|line| format!(" (line {line})"))
                    .unwrap_or_default();
                return Err(admin_error(status).context(format!(
                    "a batch was refused{line}: {revoked} of {total} target(s) were revoked before it (they stay revoked), the rest were not"
                )));
            }
        };
        revoked += response.revocations.len();
        synced += response.synced;
        queued += response.queued;
        if total > REVOKE_BATCH_SIZE {
            eprintln!("revoked {revoked}/{total}");
        }
    }
    println!("revoked:  {revoked} target(s) from {name}");
    if synced == 0 && queued == 0 {
        println!("redis:    not written: embedded mode (this instance only)");
    } else {
        println!(
            "redis:    {synced} written and published, {queued} queued until Redis is back (see `portcullis status`)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The line of the target a refused batch names (`targets[i]: ...`).
fn batch_error_line(status: &tonic::Status, batch: &[ListedTarget]) -> Option<usize> {
    let rest = status.message().strip_prefix("targets[")?;
    let (index, _) = rest.split_once(']')?;
    batch.get(index.parse::<usize>().ok()?).map(|t| t.line)
}

pub(super) async fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    use pb::target::Kind;
    if args.before.is_some()
        && (args.jti.is_some() || args.api_key.is_some() || args.from_file.is_some())
    {
        bail!(
            "--before goes with --sub, --kid, --client or --all-from-issuer (in a file: before= on the line)"
        );
    }
    if let Some(path) = &args.from_file {
        return revoke_from_file(&args.admin, path, args.reason).await;
    }
    let kind = if let Some(jti) = args.jti {
        Kind::Token(pb::TokenTarget {
            jti,
            issuer: args.issuer.unwrap_or_default(),
            expires_at: args.exp,
        })
    } else if let Some(sub) = args.sub {
        Kind::Subject(pb::SubjectTarget {
            sub,
            issued_before: parse_cutoff(args.before.as_deref().unwrap_or("now"))?,
        })
    } else if let Some(kid) = args.kid {
        match &args.before {
            None => Kind::KeyId(kid),
            Some(text) => Kind::Key(pb::KeyTarget {
                kid,
                issued_before: Some(cutoff_or_now(text)?),
            }),
        }
    } else if let Some(client) = args.client {
        match &args.before {
            None => Kind::ClientId(client),
            Some(text) => Kind::Client(pb::ClientTarget {
                client_id: client,
                issued_before: Some(cutoff_or_now(text)?),
            }),
        }
    } else if let Some(issuer) = args.all_from_issuer {
        Kind::Issuer(pb::IssuerTarget {
            issuer,
            issued_before: parse_cutoff(args.before.as_deref().unwrap_or("now"))?,
        })
    } else if let Some(id) = args.api_key {
        Kind::ApiKeyId(id)
    } else {
        bail!("one of --jti, --sub, --kid, --client, --all-from-issuer, --api-key is required");
    };
    let mut client = admin_client(&args.admin).await?;
    let response = client
        .revoke(pb::RevokeRequest {
            target: Some(pb::Target { kind: Some(kind) }),
            reason: args.reason,
        })
        .await
        .map_err(admin_error)?
        .into_inner();
    let entry = response.revocation.unwrap_or_default();
    let (kind, target) = describe_target(entry.target.as_ref());
    println!("revoked:  {kind} {target}");
    println!("expires:  {}", rfc3339(entry.expires_at));
    println!(
        "redis:    {}",
        if response.synced {
            "written and published"
        } else {
            "not written: embedded mode, or queued until Redis is back (see `portcullis status`)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn revocations(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let mut client = admin_client(&args).await?;
    let list = client
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .map_err(admin_error)?
        .into_inner()
        .revocations;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<8} {:<21} {:<21} TARGET [REASON]",
        "KIND", "CREATED", "EXPIRES"
    )?;
    for entry in &list {
        let (kind, target) = describe_target(entry.target.as_ref());
        let reason = if entry.reason.is_empty() {
            String::new()
        } else {
            format!(" [{}]", entry.reason)
        };
        writeln!(
            out,
            "{kind:<8} {:<21} {:<21} {target}{reason}",
            rfc3339(entry.created_at),
            rfc3339(entry.expires_at)
        )?;
    }
    writeln!(out, "{} revocation(s)", list.len())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::target::Kind;

    #[test]
    fn target_lists_are_parsed_line_by_line() {
        let text = "# incident 42\n\
                    jti abc-1\n\
                    \n\
                    jti abc#2 issuer=https://idp.example.com exp=1900000000 # stolen\n\
                    \tsub alice before=2026-11-29T10:00:00Z\n\
                    sub bob before=now\n\
                    kid k1\n\
                    client web-app\n\
                    api_key key-7\n";
        let targets = parse_target_list(text).unwrap();
        let lines: Vec<usize> = targets.iter().map(|t| t.line).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7, 8, 9]);
        let kinds: Vec<Kind> = targets
            .into_iter()
            .map(|t| t.target.kind.unwrap())
            .collect();
        assert_eq!(
            kinds[1],
            Kind::Token(pb::TokenTarget {
                jti: "abc#2".into(),
                issuer: "https://idp.example.com".into(),
                expires_at: Some(1_900_000_000),
            })
        );
        assert_eq!(
            kinds[2],
            Kind::Subject(pb::SubjectTarget {
                sub: "alice".into(),
                issued_before: Some(1_795_946_400),
            })
        );
        assert_eq!(
            kinds[3],
            Kind::Subject(pb::SubjectTarget {
                sub: "bob".into(),
                issued_before: None,
            })
        );
        assert_eq!(kinds[6], Kind::ApiKeyId("key-7".into()));
    }

    #[test]
    fn every_bad_line_is_reported_without_its_values() {
        let text = "jti ok\n\
                    token secret-value-1\n\
                    jti\n\
                    jti secret-value-2 exp=soon\n\
                    sub secret-value-3 before=yesterday\n\
                    kid secret-value-4 issuer=x\n\
                    jti secret-value-5 extra\n\
                    jti secret-value-6 exp=1 exp=2\n\
                    client secret-value-7\n";
        let errors = parse_target_list(text).unwrap_err();
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8"
            ]
        );
        for error in &errors {
            assert!(!error.contains("secret"), "{error}");
        }
        let long = format!("jti {}\n", "x".repeat(crate::revocation::MAX_ID_BYTES + 1));
        assert_eq!(parse_target_list(&long).unwrap_err().len(), 1);
    }
}
