//! What the vault looks like now: `status` and `workload` (list, logs).

use super::client::*;
use super::session::current_session;
use super::*;
use crate::cli::{IdentityArg, NetworkCommand, WorkloadCommand};
use anyhow::Result;
use coffre::exit;
use coffre_daemon::api::ApiCommand;

pub fn status(ida: IdentityArg, json: bool) -> Result<u8> {
    match simple(&ida, ApiCommand::Status)? {
        Ok(mut v) => {
            // The caller's own certificate, from their identity file.
            if let Ok((_, id)) = load_identity(&ida)
                && let Some((end, subject)) = coffre_daemon::pki::pem_not_after(&id.cert_pem)
                && let Some(rows) = v["certificates"].as_array_mut()
            {
                let now = i64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                )
                .unwrap_or(i64::MAX);
                let days = (end - now).div_euclid(86_400);
                rows.push(serde_json::json!({
                    "what": "yours", "subject": subject, "not_after": end, "days_left": days,
                    "expiring": days < coffre_daemon::pki::EXPIRY_WARNING_DAYS,
                }));
            }
            if json {
                print_json(&v)?;
            } else {
                // Storage hosts' errors, directory entries: shown with
                // their control characters escaped.
                coffre_sys::shown::told_all(&mut v);
                println!("state:   {}", v["state"].as_str().unwrap_or("?"));
                for c in v["certificates"].as_array().into_iter().flatten() {
                    if c["expiring"] != true {
                        continue;
                    }
                    let days = c["days_left"].as_i64().unwrap_or(0);
                    let fix = match c["what"].as_str() {
                        Some("yours") => "coffre renew",
                        Some("server") => "on the host: coffre renew --server DIR",
                        Some("gateway") => "on the host: coffre renew --gateway DIR",
                        _ => "see docs/operations.md, \"Certificates\"",
                    };
                    println!(
                        "WARNING: the {} certificate ({}) {} {}; {fix}",
                        c["what"].as_str().unwrap_or("?"),
                        c["subject"].as_str().unwrap_or("?"),
                        if days < 0 { "ended on" } else { "ends on" },
                        iso(c["not_after"].as_u64().unwrap_or(0) * 1000),
                    );
                }
                if v["control"]["saved"] == false {
                    println!(
                        "control: NOT SAVED ({}); a restart now would forget the latest changes (a lock among them); tried again twice a second",
                        v["control"]["error"].as_str().unwrap_or("?"),
                    );
                }
                if v["audit"]["writable"] == false {
                    println!(
                        "audit:   CANNOT BE WRITTEN ({}); {} record(s) waiting; only lock and leave are accepted",
                        v["audit"]["error"].as_str().unwrap_or("?"),
                        v["audit"]["waiting"]
                    );
                }
                if let Some(l) = v["lock"].as_object() {
                    println!(
                        "locked by {} : {}",
                        l["by"].as_str().unwrap_or("?"),
                        l["reason"].as_str().unwrap_or("")
                    );
                    println!(
                        "unlock:  {} of {} approval(s)",
                        v["unlock_approvals"].as_array().map_or(0, Vec::len),
                        v["unlock_quorum"]
                    );
                }
                match v["mode_pending"].as_str() {
                    Some(p) => println!(
                        "mode:    {} in force; {p} from the next close",
                        v["mode"].as_str().unwrap_or("?")
                    ),
                    None => println!("mode:    {}", v["mode"].as_str().unwrap_or("?")),
                }
                let d = &v["data"];
                if d["mounted"].as_bool() == Some(true) {
                    println!(
                        "data:    {} (mounted from {})",
                        d["mountpoint"].as_str().unwrap_or("?"),
                        d["loop_device"].as_str().unwrap_or("?")
                    );
                    println!(
                        "nbd:     {} ({} client(s)); exports: {}",
                        d["nbd_socket"].as_str().unwrap_or("?"),
                        d["nbd_clients"],
                        d["exports"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(", "))
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "none".into())
                    );
                } else if let Some(mp) = d["mountpoint"].as_str() {
                    println!("data:    {mp} (not mounted)");
                }
                let nfs = &v["nfs"];
                if nfs["configured"] == true {
                    let said =
                        |st: &serde_json::Value, key: &str, yes: &str, no: &str| match &st[key] {
                            serde_json::Value::Bool(true) => format!(", {yes}"),
                            serde_json::Value::Bool(false) => format!(", {no}"),
                            _ => String::new(),
                        };
                    let shares: Vec<String> = nfs["exports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| {
                            format!(
                                "{} ({}) mounts {} as uid {}{}{}{} ({})",
                                e["workload"].as_str().unwrap_or("?"),
                                e["client"].as_str().unwrap_or("?"),
                                e["share"].as_str().unwrap_or("?"),
                                e["uid"],
                                if e["readonly"] == true {
                                    ", read-only"
                                } else {
                                    ""
                                },
                                if e["async"] == true {
                                    ", async (changes not synced before each reply)"
                                } else {
                                    ""
                                },
                                if e["refused"] == true {
                                    ", REFUSED (not a member)"
                                } else {
                                    ""
                                },
                                match e["pid"].as_u64() {
                                    _ if e["stats"]["busy"] == true => {
                                        "its server: busy with an open or a close".into()
                                    }
                                    Some(pid) => format!(
                                        "its server: pid {pid}{}{}",
                                        said(
                                            &e["stats"],
                                            "confined",
                                            "confined (Landlock)",
                                            "NOT confined (see its log)"
                                        ),
                                        said(
                                            &e["stats"],
                                            "filtered",
                                            "seccomp filter",
                                            "NO seccomp filter (see its log)"
                                        ),
                                    ),
                                    None => "its server is not running".into(),
                                },
                            )
                        })
                        .collect();
                    println!(
                        "nfs:     a server and its handle broker per VM; {}",
                        shares.join("; ")
                    );
                }
                let st = &v["data"]["storage"];
                if let Some(url) = st["url"].as_str() {
                    println!(
                        "storage: {url}{}: chunks of {} KiB, root epoch {} kept locally (a store that serves an older one is refused at open)",
                        st["endpoint"]
                            .as_str()
                            .map(|e| format!(" at {e}"))
                            .unwrap_or_default(),
                        st["chunk_size"].as_u64().unwrap_or(0) / 1024,
                        st["root_epoch"],
                    );
                    for m in st["stores"].as_array().into_iter().flatten() {
                        if m["in_step"] == true {
                            println!("  {}: in step", m["name"].as_str().unwrap_or("?"));
                        } else {
                            println!(
                                "  {}: STALE since {} ({}): {} epoch(s) behind, {} object(s) to copy; brought back in the background",
                                m["name"].as_str().unwrap_or("?"),
                                m["stale_since"],
                                m["reason"].as_str().unwrap_or("?"),
                                m["behind"],
                                m["to_copy"]
                            );
                        }
                    }
                }
                let dir = &v["directory"];
                if let Some(addr) = dir["ldaps"].as_str() {
                    let st = &dir["stats"];
                    let server = match dir["pid"].as_u64() {
                        Some(pid) if st.is_object() => format!(
                            "server pid {pid}: {} connection(s), {} search(es), {} bind(s), {} from unknown addresses refused",
                            st["connections"], st["searches"], st["binds"], st["refused_addresses"]
                        ),
                        Some(pid) => format!("server pid {pid}"),
                        None => "server not running".into(),
                    };
                    println!(
                        "directory: {addr} and ldap://{}/ with StartTLS, base {}, for the workloads; {server}",
                        dir["address"].as_str().unwrap_or("?"),
                        dir["base"].as_str().unwrap_or("?"),
                    );
                }
                let src = &v["source"];
                if let Some(url) = src["url"].as_str() {
                    let health = if src["reachable"] == true {
                        format!(
                            "answers (last answer {} s ago; every member checked every {} s)",
                            src["last_answer_s_ago"], src["recheck_s"]
                        )
                    } else {
                        format!(
                            "DOES NOT ANSWER for {} s ({}): nobody can enter; members inside stay up to {} s",
                            src["last_answer_s_ago"],
                            src["error"].as_str().unwrap_or("?"),
                            src["max_stale_s"]
                        )
                    };
                    println!("members' source: the organisation's directory {url}: {health}");
                    for r in src["refused"].as_array().into_iter().flatten() {
                        println!(
                            "  {} does not qualify: {}",
                            r["member"].as_str().unwrap_or("?"),
                            r["why"].as_str().unwrap_or("?")
                        );
                    }
                }
                println!("members: {}", v["members"]);
                for p in v["proposals"].as_array().into_iter().flatten() {
                    println!(
                        "proposal: {} {} by {} ({}/{} approvals; `coffre approve {}`)",
                        p["id"].as_str().unwrap_or("?"),
                        p["description"].as_str().unwrap_or("?"),
                        p["by"].as_str().unwrap_or("?"),
                        p["approvals"].as_array().map_or(0, Vec::len),
                        p["needed"],
                        p["id"].as_str().unwrap_or("?"),
                    );
                }
                for s in v["sessions"].as_array().into_iter().flatten() {
                    println!(
                        "inside:  {} via {} from {} since {} (session {})",
                        s["member"].as_str().unwrap_or("?"),
                        s["door"].as_str().unwrap_or("?"),
                        s["from"].as_str().unwrap_or("?"),
                        iso(s["since_ms"].as_u64().unwrap_or(0)),
                        s["session"]
                    );
                }
                let g = &v["gateway"];
                if g["configured"].as_bool() == Some(true) {
                    if g["openvpn_connected"].as_bool() == Some(true) {
                        println!(
                            "vpn:     OpenVPN (pid {}) connected, {} client(s)",
                            g["openvpn_pid"],
                            g["clients"].as_array().map_or(0, Vec::len)
                        );
                    } else {
                        println!(
                            "vpn:     OpenVPN not reachable: {}",
                            g["down_reason"].as_str().unwrap_or("not connected yet")
                        );
                    }
                }
                for w in v["workloads"].as_array().into_iter().flatten() {
                    println!("workload: {}", workload_line(w));
                }
                for t in v["tasks"].as_array().into_iter().flatten() {
                    let via = t["by"]
                        .as_str()
                        .map(|b| format!(" (scheduler {b})"))
                        .unwrap_or_default();
                    println!(
                        "task:    {} {:?} by {}{via} until {} ms",
                        t["task_id"],
                        t["task_name"].as_str().unwrap_or(""),
                        t["task_user"].as_str().unwrap_or("?"),
                        t["expires_ms"]
                    );
                }
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}

/// One workload as status and `workload list` show it.
pub(super) fn workload_line(w: &serde_json::Value) -> String {
    let pid = w["pid"]
        .as_i64()
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default();
    let note = w["note"].as_str().filter(|n| !n.is_empty());
    format!(
        "{} [{} {}] {}{pid} since {}{}",
        w["name"].as_str().unwrap_or("?"),
        w["role"].as_str().unwrap_or("?"),
        w["kind"].as_str().unwrap_or("?"),
        w["state"].as_str().unwrap_or("?"),
        iso(w["since_ms"].as_u64().unwrap_or(0)),
        note.map(|n| format!(": {n}")).unwrap_or_default()
    )
}

pub fn workload(cmd: WorkloadCommand) -> Result<u8> {
    match cmd {
        WorkloadCommand::List { id, json } => match simple(&id, ApiCommand::Status)? {
            Ok(mut v) => {
                if json {
                    print_json(&v["workloads"])?;
                } else {
                    coffre_sys::shown::told_all(&mut v);
                    match v["mode_pending"].as_str() {
                        Some(p) => println!(
                            "mode: {} in force; {p} from the next close",
                            v["mode"].as_str().unwrap_or("?")
                        ),
                        None => println!("mode: {}", v["mode"].as_str().unwrap_or("?")),
                    }
                    for w in v["workloads"].as_array().into_iter().flatten() {
                        println!("{}", workload_line(w));
                    }
                }
                Ok(exit::OK)
            }
            Err((code, msg)) => Ok(fail(code, &msg)),
        },
        WorkloadCommand::Logs { name, bytes, id } => {
            let (path, ident) = load_identity(&id)?;
            let session = current_session(&path)?;
            let cmd = ApiCommand::WorkloadLogs {
                session,
                name,
                bytes,
            };
            match runtime()?.block_on(call(&ident, &cmd))? {
                Ok(v) => {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(v["log_b64"].as_str().unwrap_or_default())
                        .unwrap_or_default();
                    use std::io::Write;
                    std::io::stdout().write_all(&raw)?;
                    Ok(exit::OK)
                }
                Err((code, msg)) => Ok(fail(code, &msg)),
            }
        }
    }
}

pub fn network(cmd: NetworkCommand) -> Result<u8> {
    let NetworkCommand::Show { id, json } = cmd;
    match simple(&id, ApiCommand::Status)? {
        Ok(mut v) => {
            if json {
                print_json(&v["network"])?;
                return Ok(exit::OK);
            }
            coffre_sys::shown::told_all(&mut v);
            let n = &v["network"];
            if n["configured"] != true {
                println!("no vault network (config.toml has no [network] section)");
                return Ok(exit::OK);
            }
            let s = |x: &serde_json::Value| x.as_str().unwrap_or("?").to_string();
            let list = |x: &serde_json::Value| {
                let items: Vec<String> = x
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect();
                if items.is_empty() {
                    "none".to_string()
                } else {
                    items.join(", ")
                }
            };
            println!(
                "network: {} (host {}), firewall table {}",
                s(&n["subnet"]),
                s(&n["gateway"]),
                s(&n["table"])
            );
            println!("egress:  {}", list(&n["egress"]));
            println!(
                "every workload reaches the vault's directory at {} (tcp/389 with StartTLS, tcp/636 LDAPS); nothing else of the host",
                s(&n["gateway"])
            );
            for w in n["workloads"].as_array().into_iter().flatten() {
                let members = match &w["members"] {
                    serde_json::Value::String(t) => t.clone(),
                    m => list(m),
                };
                println!(
                    "{} at {}: ports {} reachable by {members} over the VPN and by the other workloads; egress {}; connected now: {}{}",
                    s(&w["name"]),
                    s(&w["address"]),
                    list(&w["ports"]),
                    list(&w["egress"]),
                    list(&w["vpn_addresses_now"]),
                    if w["nfs"] == true {
                        "; reaches the vault's NFS server (its share)"
                    } else {
                        ""
                    },
                );
            }
            for c in n["clients"].as_array().into_iter().flatten() {
                println!(
                    "client {} at {} reaches {}",
                    s(&c["member"]),
                    c["vpn_address"].as_str().unwrap_or("(no address yet)"),
                    list(&c["reaches"])
                );
            }
            Ok(exit::OK)
        }
        Err((code, msg)) => Ok(fail(code, &msg)),
    }
}
