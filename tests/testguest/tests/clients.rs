// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Clients at run time, end to end: `ctl add-client`, `remove-client`, `list-clients`,
//! `reload` and SIGHUP against the real binary, with userspace guests on the added sockets.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tmem_testguest::daemon::{self, Daemon};
use tmem_testguest::{pages, Guest, GuestOptions};

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `vhost-tmem ctl --control DIR/control.sock ARGS...`
fn ctl(d: &Daemon, args: &[&str]) -> Output {
    Command::new(daemon::binary().unwrap())
        .arg("ctl")
        .arg("--control")
        .arg(d.path("control.sock"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A refusal's message (exit 1).
fn refused(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refusal, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Polls (at most 10 s) until `cond` holds.
fn eventually(what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("never happened: {what}\n{}", d.log());
}

fn guest(path: &Path) -> Guest {
    Guest::connect(
        path,
        GuestOptions {
            timeout: Duration::from_secs(3),
            ..GuestOptions::default()
        },
    )
    .unwrap()
}

/// Puts `count` pages into a fresh pool of `g` and reads each back byte for byte (in an
/// ephemeral pool, each page that was taken: incompressible ones are refused).
fn store_and_verify(g: &mut Guest, persistent: bool, seed: u64, count: u64) -> u32 {
    let pool = g.create_pool(persistent, None).unwrap();
    let mut taken = Vec::new();
    for i in 0..count {
        match g.put(pool, [seed, 0, 0], i, &pages::page(seed + i)) {
            Ok(()) => taken.push(i),
            Err(tmem_testguest::Error::Status(shared_proto::Status::Refused)) if !persistent => {}
            Err(e) => panic!("put {i}: {e}"),
        }
    }
    assert!(taken.len() as u64 > count / 2);
    let mut out = vec![0u8; 4096];
    for i in taken {
        g.get(pool, [seed, 0, 0], i, false, &mut out).unwrap();
        assert!(out == pages::page(seed + i), "page {i} differs");
    }
    pool
}

fn list(d: &Daemon) -> Vec<Value> {
    d.control(&json!({"cmd": "list-clients"})).unwrap()["clients"]
        .as_array()
        .unwrap()
        .clone()
}

fn listed(d: &Daemon, name: &str) -> Option<Value> {
    list(d).into_iter().find(|c| c["name"] == name)
}

fn used(d: &Daemon) -> u64 {
    n(&d.stats().unwrap()["memory_used_bytes"])
}

/// The daemon's log without terminal colour sequences.
fn plain_log(d: &Daemon) -> String {
    let log = d.log();
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            // ESC [ ... final letter
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn lock_of(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", p.display()))
}

#[test]
fn add_serve_list_and_remove_a_client_at_run_time() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    // Something stored by another client stays through all of this.
    let mut a = guest(&d.path("a.sock"));
    let a_pool = store_and_verify(&mut a, true, 1, 50);
    let before = used(&d);

    let sock = d.path("vm3.sock");
    let spec = format!("name=vm3,socket={},quota=64M,weight=300", sock.display());
    ok(&ctl(&d, &["add-client", &spec]));
    assert!(sock.exists());
    // Same rules as the sockets made at start: private to the daemon's user.
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let c = d.client_stats("vm3").unwrap();
    assert_eq!((n(&c["quota_bytes"]), n(&c["weight"])), (64 << 20, 300));

    let mut g = guest(&sock);
    store_and_verify(&mut g, true, 100, 200);
    store_and_verify(&mut g, false, 1000, 100);
    let l = listed(&d, "vm3").expect("vm3 listed");
    assert_eq!(l["connected"], true, "{l}");
    assert_eq!(l["socket"], sock.display().to_string());
    assert_eq!(n(&l["pools"]), 2);
    assert!(n(&l["pages"]) >= 200, "{l}");
    assert_eq!((n(&l["quota_bytes"]), n(&l["weight"])), (64 << 20, 300));
    // Readable from the command line too.
    let text = ok(&ctl(&d, &["list-clients"]));
    let line = text.lines().find(|l| l.starts_with("vm3")).expect(&text);
    assert!(line.contains("connected") && line.contains("64M"), "{text}");

    // Refused while the frontend is connected, and nothing happens to it.
    let e = refused(&ctl(&d, &["remove-client", "vm3"]));
    assert!(e.contains("connected") && e.contains("--force"), "{e}");
    store_and_verify(&mut g, true, 5000, 10);

    // Forced: the connection ends, every page goes, the memory returns, the socket is gone.
    let out = ok(&ctl(&d, &["remove-client", "vm3", "--force"]));
    assert!(out.contains("pages"), "{out}");
    assert!(listed(&d, "vm3").is_none());
    assert!(d.client_stats("vm3").is_err());
    assert_eq!(used(&d), before, "memory back to what it was");
    assert!(!sock.exists() && !lock_of(&sock).exists());
    assert!(g.put(3, [1, 0, 0], 0, &pages::page(1)).is_err());
    let log = plain_log(&d);
    let line = log
        .lines()
        .find(|l| l.contains("client removed"))
        .expect(&log);
    assert!(
        line.contains("persistent_pages=210") && line.contains("dropped"),
        "{line}"
    );

    // The name and the socket can be used again: a fresh client.
    ok(&ctl(
        &d,
        &["add-client", &format!("name=vm3,socket={}", sock.display())],
    ));
    let mut g = guest(&sock);
    let pool = store_and_verify(&mut g, true, 7, 20);
    let mut out = vec![0u8; 4096];
    assert!(g.get(pool, [100, 0, 0], 0, false, &mut out).is_err());
    drop(g);
    eventually("vm3 disconnected", &d, || {
        listed(&d, "vm3").is_some_and(|c| c["connected"] == false)
    });
    // Not connected: no --force needed.
    ok(&ctl(&d, &["remove-client", "vm3"]));
    assert_eq!(used(&d), before);

    // The other client saw none of it.
    let mut out = vec![0u8; 4096];
    for i in 0..50 {
        a.get(a_pool, [1, 0, 0], i, false, &mut out).unwrap();
        assert!(out == pages::page(1 + i));
    }
}

#[test]
fn bad_client_requests_name_the_problem() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    let dir = d.dir().display().to_string();
    let cases = [
        (
            format!("name=b,socket={dir}/b.sock,colour=red"),
            "unknown key \"colour\"",
        ),
        (
            format!("name=b,socket={dir}/b.sock,weight=0"),
            "invalid weight",
        ),
        (
            format!("name=b,socket={dir}/b.sock,quota=lots"),
            "invalid size \"lots\"",
        ),
        (
            format!("name=b,socket={dir}/b.sock,compressor=brotli"),
            "unknown compressor \"brotli\"",
        ),
        (
            format!("name=b,socket={dir}/b.sock,shared=xyz"),
            "invalid shared pool UUID",
        ),
        (format!("socket={dir}/b.sock"), "name= is missing"),
        ("name=b,fd=3".to_string(), "socket="),
        (
            format!("name=a,socket={dir}/b.sock"),
            "a client named \"a\"",
        ),
        (format!("name=b,socket={dir}/a.sock"), "already serves"),
        (
            format!("name=b,socket={dir}/control.sock"),
            "in use by another process",
        ),
        (
            format!("name=b,socket={dir}/daemon.log"),
            "exists and is not a socket",
        ),
    ];
    for (spec, want) in &cases {
        let e = refused(&ctl(&d, &["add-client", spec]));
        assert!(e.contains(want), "{spec}: {e}");
    }
    // Nothing of them was made.
    assert_eq!(list(&d).len(), 1);
    assert!(!d.path("b.sock").exists());
    let e = refused(&ctl(&d, &["remove-client", "nobody"]));
    assert!(e.contains("no client named \"nobody\""), "{e}");
    // Without --config there is nothing to reload.
    let e = refused(&ctl(&d, &["reload"]));
    assert!(e.contains("--config"), "{e}");
}

fn write_config(p: &Path, body: &str) {
    // Written aside and renamed, as an editor does: a SIGHUP never reads half a file.
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

fn config_a(dir: &str, limit: &str, quota: &str, weight: u32) -> String {
    format!(
        "memory_limit = \"{limit}\"\n\
         [[client]]\nname = \"a\"\nsocket = \"{dir}/a.sock\"\nquota = \"{quota}\"\nweight = {weight}\n"
    )
}

fn reload(d: &Daemon) -> Value {
    d.control(&json!({"cmd": "reload"})).unwrap()["reload"].take()
}

fn wait_for(d: &Daemon, p: &Path) {
    eventually(&format!("{} exists", p.display()), d, || p.exists());
}

#[test]
fn reload_applies_the_file_all_or_nothing() {
    let dir = std::env::temp_dir().join(format!("vhost-tmem-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("tmem.toml");
    let ds = dir.display().to_string();
    write_config(&conf, &config_a(&ds, "256M", "32M", 100));
    let conf_s = conf.display().to_string();
    let d = Daemon::start(&["--config", &conf_s]).unwrap();
    wait_for(&d, &dir.join("a.sock"));

    // Unchanged file: nothing to do.
    let r = reload(&d);
    assert_eq!(r["changed"], json!([]), "{r}");
    assert_eq!(r["added"], json!([]), "{r}");

    // Limit, quota, weight changed; a client added.
    let mut body = config_a(&ds, "512M", "48M", 250);
    body.push_str(&format!(
        "[[client]]\nname = \"b\"\nsocket = \"{ds}/b.sock\"\nweight = 50\n"
    ));
    write_config(&conf, &body);
    let r = reload(&d);
    assert_eq!(r["added"], json!(["b"]), "{r}");
    let changed = r["changed"].to_string();
    assert!(
        changed.contains("memory limit") && changed.contains("quota") && changed.contains("weight"),
        "{r}"
    );
    let s = d.stats().unwrap();
    assert_eq!(n(&s["memory_limit_bytes"]), 512 << 20);
    let a = d.client_stats("a").unwrap();
    assert_eq!((n(&a["quota_bytes"]), n(&a["weight"])), (48 << 20, 250));
    assert_eq!(n(&d.client_stats("b").unwrap()["weight"]), 50);
    let mut g = guest(&dir.join("b.sock"));
    store_and_verify(&mut g, true, 9, 30);

    // A client added at run time is not in the file: reported, not removed.
    let c_sock = dir.join("c.sock");
    ok(&ctl(
        &d,
        &["add-client", &format!("name=c,socket={}", c_sock.display())],
    ));
    let r = reload(&d);
    assert_eq!(r["not_in_file"], json!(["c"]), "{r}");
    assert!(listed(&d, "c").is_some() && c_sock.exists());
    assert!(plain_log(&d).contains("not in the configuration file"));
    // The CLI says so too.
    let text = ok(&ctl(&d, &["reload"]));
    assert!(
        text.contains("c") && text.contains("not in the configuration file"),
        "{text}"
    );

    // Broken files: refused with the reason, nothing applied (the good parts neither).
    let good_part = config_a(&ds, "128M", "16M", 700);
    let broken = [
        (
            format!("{good_part}bogus = 1\n"),
            "invalid configuration file",
        ),
        (
            format!("{good_part}[[client]]\nname = \"z\"\nsocket = \"{ds}/z.sock\"\nweight = 0\n"),
            "invalid weight",
        ),
        (
            format!("{good_part}[[client]]\nname = \"z\"\nsocket = \"{ds}/a.sock\"\n"),
            "two clients use the socket",
        ),
        (
            format!("{good_part}[[client]]\nname = \"z\"\nsocket = \"{ds}/c.sock\"\n"),
            "already serves",
        ),
        (
            format!(
                "{good_part}[[client]]\nname = \"z\"\nsocket = \"{}\"\n",
                d.path("control.sock").display()
            ),
            "in use by another process",
        ),
    ];
    for (body, want) in &broken {
        write_config(&conf, body);
        let e = d
            .control(&json!({"cmd": "reload"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{body}: {e}");
        let s = d.stats().unwrap();
        assert_eq!(n(&s["memory_limit_bytes"]), 512 << 20, "{body}");
        let a = d.client_stats("a").unwrap();
        assert_eq!((n(&a["quota_bytes"]), n(&a["weight"])), (48 << 20, 250));
        assert!(d.client_stats("z").is_err() && !dir.join("z.sock").exists());
    }
    let e = refused(&ctl(&d, &["reload"]));
    assert!(e.contains("in use by another process"), "{e}");

    // SIGHUP does what `ctl reload` does.
    write_config(
        &conf,
        &format!(
            "{}{}",
            config_a(&ds, "300M", "40M", 400),
            "[[client]]\nname = \"b\"\nsocket = \"".to_string() + &ds + "/b.sock\"\n"
        ),
    );
    let st = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    eventually("SIGHUP applied the file", &d, || {
        d.client_stats("a").is_ok_and(|a| n(&a["weight"]) == 400)
    });
    let s = d.stats().unwrap();
    assert_eq!(n(&s["memory_limit_bytes"]), 300 << 20);
    assert_eq!(n(&d.client_stats("a").unwrap()["quota_bytes"]), 40 << 20);
    // b's weight went back to the default: the file is what counts.
    assert_eq!(n(&d.client_stats("b").unwrap()["weight"]), 100);
    eventually("the SIGHUP reload logged", &d, || {
        let log = plain_log(&d);
        log.contains("SIGHUP") && log.matches("not in the configuration file").count() >= 3
    });
    // The guest on b was not disturbed.
    store_and_verify(&mut g, true, 77, 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adds, forced and unforced removals, lists and guests connecting, all at once over several
/// control connections, some on one contested name: every request gets an answer, the daemon
/// stays up, and once everything is removed the memory and the directory are as before.
#[test]
fn concurrent_adds_and_removals_leave_nothing_behind() {
    let d = Arc::new(Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap());
    let before = used(&d);
    let dir = d.dir().display().to_string();
    let mut threads = Vec::new();
    for t in 0..3 {
        let (d, dir) = (d.clone(), dir.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..8u64 {
                let sock = format!("{dir}/own{t}.sock");
                d.control(&json!({"cmd": "add-client", "spec": format!("name=own{t},socket={sock}")}))
                    .unwrap();
                if i % 2 == 0 {
                    let mut g = guest(Path::new(&sock));
                    store_and_verify(&mut g, true, t * 1000 + i * 100, 20);
                    // Removed under the guest's feet.
                    d.control(&json!({"cmd": "remove-client", "client": format!("own{t}"), "force": true}))
                        .unwrap();
                } else {
                    d.control(&json!({"cmd": "remove-client", "client": format!("own{t}")}))
                        .unwrap();
                }
            }
        }));
    }
    for t in 0..2 {
        let (d, dir) = (d.clone(), dir.clone());
        threads.push(std::thread::spawn(move || {
            let mut answers = std::collections::BTreeSet::new();
            for i in 0..15 {
                let r = if (i + t) % 2 == 0 {
                    d.control(&json!({"cmd": "add-client", "spec": format!("name=same,socket={dir}/same.sock")}))
                } else {
                    d.control(&json!({"cmd": "remove-client", "client": "same", "force": i % 3 == 0}))
                };
                match r {
                    Ok(_) => answers.insert("ok".to_string()),
                    Err(e) => {
                        let e = e.to_string();
                        // (JSON-quoted: the names' quotes are escaped.)
                        let known = [
                            "a client named",
                            "is being removed",
                            "is already being removed",
                            "no client named",
                            "has a frontend connected",
                        ];
                        assert!(known.iter().any(|k| e.contains(k)), "{e}");
                            answers.insert(e)
                    }
                };
            }
        }));
    }
    {
        let d = d.clone();
        threads.push(std::thread::spawn(move || {
            for _ in 0..30 {
                let l = list(&d);
                assert!(l.iter().any(|c| c["name"] == "a"));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let _ = d.control(&json!({"cmd": "remove-client", "client": "same", "force": true}));
    let names: Vec<Value> = list(&d).iter().map(|c| c["name"].clone()).collect();
    assert_eq!(names, vec![json!("a")]);
    assert_eq!(used(&d), before);
    let mut left: Vec<String> = std::fs::read_dir(d.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "a.sock",
            "a.sock.lock",
            "control.sock",
            "control.sock.lock",
            "daemon.log"
        ]
    );
    assert!(!plain_log(&d).contains("panicked"), "{}", d.log());
}
