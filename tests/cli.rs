//! The client commands against a real worker: submit, result, wait, log,
//! list, config check, and how the spool is found.

mod common;

use std::fs;
use std::process::{Command, Stdio};

use common::{BIN, DEADLINE, Spool, wait_for};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn submit_wait_result_log_and_list() {
    let spool = Spool::new();
    let _w = spool.start("");
    let out = spool.cli(&[
        "submit", "--id", "hello", "--wait", "--", "echo", "hi;", "exit", "3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("hello\n"), "{text}");
    assert!(text.contains("status:    failed (exit code 3)"), "{text}");

    let out = spool.cli(&["result", "hello", "--json"]);
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["submitted_via"], "cli", "{r}");
    assert_eq!(
        r["submitted_by"]["uid"],
        nix::unistd::geteuid().as_raw(),
        "{r}"
    );

    let out = spool.cli(&["log", "hello"]);
    assert_eq!(stdout(&out), "hi\n");

    let out = spool.cli(&["wait", "hello", "--json"]);
    assert_eq!(out.status.code(), Some(3));

    let out = spool.cli(&["submit", "--", "true"]);
    assert!(out.status.success());
    let generated = stdout(&out).trim().to_owned();
    assert!(generated.starts_with("job-"), "{generated}");
    let out = spool.cli(&["wait", &generated, "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = spool.cli(&["list", "--state", "completed", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(
        ids.contains(&"hello") && ids.contains(&generated.as_str()),
        "{ids:?}"
    );
    assert!(
        list.iter()
            .all(|e| e["state"] == "completed" && e["result"].is_object())
    );
    let table = stdout(&spool.cli(&["list"]));
    assert!(
        table.lines().next().unwrap().starts_with("STATE"),
        "{table}"
    );
    assert!(table.contains("hello"), "{table}");
}

#[test]
fn submit_file_options_and_timeout() {
    let spool = Spool::new();
    let _w = spool.start("kill_grace = \"100ms\"\n");
    let script = spool.scratch("job.sh");
    fs::write(&script, "echo from a script\n").unwrap();
    let out = spool.cli(&[
        "submit",
        "--id",
        "scripted",
        "--wait",
        "--file",
        script.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&spool.cli(&["log", "scripted"])), "from a script\n");
    assert_eq!(spool.logs_of("scripted").len(), 1);

    let cwd = spool.scratch("");
    let out = spool.cli(&[
        "submit",
        "--id",
        "opts",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--cwd",
        cwd.to_str().unwrap(),
        "--wait",
        "--",
        "echo $A $B; pwd",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stdout(&spool.cli(&["log", "opts"]));
    assert_eq!(
        log,
        format!("1 x=y\n{}\n", fs::canonicalize(&cwd).unwrap().display())
    );

    let out = spool.cli(&[
        "submit",
        "--id",
        "short",
        "--timeout",
        "1",
        "--wait",
        "--",
        "sleep 300",
    ]);
    assert_eq!(out.status.code(), Some(124), "timed_out maps to 124");
}

#[test]
fn errors_are_clear_and_exit_non_zero() {
    let spool = Spool::new();
    // No worker has prepared this spool yet.
    let out = spool.cli(&["submit", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not a spool"), "{}", stderr(&out));

    let worker = spool.start("");
    let out = spool.cli(&["submit", "--id", "../x", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid job id"), "{}", stderr(&out));

    let out = spool.cli(&["result", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no result for nobody yet: the job is unknown"),
        "{}",
        stderr(&out)
    );

    // A mistyped id fails at once, with or without a timeout.
    for args in [
        &["wait", "nobody", "--timeout", "0"][..],
        &["wait", "nobody"],
    ] {
        let out = spool.cli(args);
        assert_eq!(out.status.code(), Some(125));
        assert!(
            stderr(&out).contains("no job nobody in") && stderr(&out).contains("a mistyped id?"),
            "{}",
            stderr(&out)
        );
    }
    let out = spool.cli(&["log", "nobody", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no job nobody in"),
        "{}",
        stderr(&out)
    );

    let out = spool.cli(&["log", "nobody"]);
    assert_eq!(out.status.code(), Some(1));

    // Once the worker is gone:
    drop(worker);
    // A job waiting on a spool no worker serves: one line says so, and the
    // wait goes on until its deadline.
    let out = spool.cli(&["submit", "--id", "alone", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let unserved = "no worker is running on";
    assert!(stderr(&out).contains(unserved), "{}", stderr(&out));
    let out = spool.cli(&["wait", "alone", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(unserved) && stderr(&out).contains("has not finished"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_duplicate_pending_id_is_refused() {
    let spool = Spool::new();
    let w = spool.start("");
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    let first = spool.cli(&["submit", "--id", "once", "--", "true"]);
    let second = spool.cli(&["submit", "--id", "once", "--", "false"]);
    w.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(first.status.success());
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("already pending"),
        "{}",
        stderr(&second)
    );
    assert_eq!(spool.wait_result("once")["status"], "succeeded");
}

#[test]
fn log_follow_streams_until_the_job_ends() {
    let spool = Spool::new();
    let _w = spool.start("");
    let gate = spool.scratch("gate");
    spool.submit(
        "stream",
        &format!(
            "echo one; while [ ! -e {} ]; do sleep 0.01; done; echo two",
            gate.display()
        ),
    );
    let follower = Command::new(BIN)
        .args([
            "--spool",
            spool.root().to_str().unwrap(),
            "log",
            "--follow",
            "stream",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the job to print its first line", DEADLINE, || {
        spool.logs_of("stream").first().and_then(|n| {
            let text = fs::read_to_string(spool.path(n)).ok()?;
            (text == "one\n").then_some(())
        })
    });
    // A second reader picks up where a first one stopped (byte 4).
    let resumed = Command::new(BIN)
        .args(["--spool", spool.root().to_str().unwrap()])
        .args(["log", "--follow", "--from", "4", "stream"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    fs::write(&gate, "").unwrap();
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "one\ntwo\n");
    let out = resumed.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "two\n");
    let at = |from: &str| spool.cli(&["log", "--from", from, "stream"]);
    assert_eq!(stdout(&at("2")), "e\ntwo\n");
    let past = at("100");
    assert!(past.status.success(), "{past:?}");
    assert_eq!(stdout(&past), "", "past the end: nothing");
}

#[test]
fn spool_comes_from_env_then_config() {
    let spool = Spool::new();
    let _w = spool.start("");
    let run = |envs: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(BIN);
        c.env_remove("AI_CMD_EXECUTOR_SPOOL")
            .env_remove("AI_CMD_EXECUTOR_CONFIG");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.args(args).output().unwrap()
    };
    let root = spool.root();
    let out = run(
        &[("AI_CMD_EXECUTOR_SPOOL", root.to_str().unwrap())],
        &["submit", "--id", "via-env", "--wait", "--", "true"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = spool.scratch("client.toml");
    fs::write(&cfg, format!("spool = {:?}\n", root.to_str().unwrap())).unwrap();
    let out = run(
        &[],
        &["--config", cfg.to_str().unwrap(), "result", "via-env"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        &[],
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--spool",
            "/nonexistent",
            "result",
            "via-env",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "--spool wins over the config");
}

#[test]
fn config_check_prints_effective_values_or_the_error_with_its_line() {
    let spool = Spool::new();
    let good = spool.scratch("good.toml");
    fs::write(&good, "max_parallel = 3\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", good.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("max_parallel = 3"), "{text}");
    assert!(text.contains("default_timeout = \"1h\""), "{text}");
    assert!(text.contains("log_max_bytes = 10485760"), "{text}");

    let bad = spool.scratch("bad.toml");
    fs::write(&bad, "max_parallel = 2\n\nstop_grace = \"-3s\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", bad.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:3:14: ", bad.display())), "{err}");

    let unknown = spool.scratch("unknown.toml");
    fs::write(&unknown, "max_paralel = 2\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", unknown.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("unknown field `max_paralel`"),
        "{}",
        stderr(&out)
    );

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent.toml", "config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent.toml"));
}

/// `status`, `health` and `diagnose` see a worker started by hand on the
/// spool they are given (it holds the spool's serving lock), and say it is
/// a foreground worker; a spool that does not exist is an error (UNKNOWN
/// for `health`), not a list of things to repair.
#[test]
fn a_foreground_worker_is_seen_and_a_missing_spool_is_unknown() {
    let spool = Spool::new();
    let worker = spool.start("");
    let pid = worker.pid();
    let out = spool.cli(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("foreground worker pid {pid} running")),
        "{}",
        stdout(&out)
    );
    let out = spool.cli(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["service"]["mode"], "foreground", "{doc}");
    let out = spool.cli(&["health", "--format", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cron = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "cron.fallback")
        .unwrap()
        .clone();
    assert_eq!(cron["level"], "ok", "{doc}");
    assert!(
        cron["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("a foreground worker, pid {pid}, serves the spool")),
        "{cron}"
    );
    let out = spool.cli(&["diagnose", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for id in ["service.process", "probe.end_to_end"] {
        let c = doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap()
            .clone();
        assert_eq!(c["level"], "ok", "{c}");
    }
    // `stop` stops it: the process the kernel says holds the lock.
    let out = spool.cli(&["stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("stopped worker pid {pid} (it was started by hand")),
        "{}",
        stdout(&out)
    );
    let mut worker = worker;
    assert!(worker.wait_exit().success());

    let missing = spool.scratch("no-such-spool");
    let m = missing.to_str().unwrap();
    let on_missing = |args: &[&str]| {
        Command::new(BIN)
            .arg("--spool")
            .arg(m)
            .args(args)
            .env_remove("AI_CMD_EXECUTOR_SPOOL")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = on_missing(&["health"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("no spool at"), "{}", stderr(&out));
    let out = on_missing(&["health", "--format", "nagios"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stdout(&out).starts_with("AI-CMD-EXECUTOR UNKNOWN - no spool at"),
        "{}",
        stdout(&out)
    );
    let out = on_missing(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!missing.exists(), "nothing was created");
}

/// The manual: `--help` ends with exit status, files, environment and
/// examples, a subcommand's own options come before the global ones and it
/// shows an example, `completions` prints a shell's script, and the man
/// pages (the tool's and the protocol's) carry the same sections.
#[test]
fn help_man_pages_and_completions() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let help = run(&["--help"]);
    for section in [
        "Exit status:",
        "Files:",
        "Environment:",
        "Examples:",
        "75 ",
        "126 ",
    ] {
        assert!(help.contains(section), "--help lacks {section:?}:\n{help}");
    }
    let submit = run(&["submit", "--help"]);
    let own = submit.find("--wait-timeout").expect("its own option");
    let global = submit.find("Global options:").expect("the global options");
    assert!(own < global, "{submit}");
    assert!(
        submit.contains("Examples:\n  ai-cmd-executor submit"),
        "{submit}"
    );
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef"),
        ("fish", "complete -c"),
    ] {
        assert!(run(&["completions", shell]).contains(marker), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    run(&["generate-assets", dir.path().to_str().unwrap()]);
    let page = fs::read_to_string(dir.path().join("man/ai-cmd-executor.1")).unwrap();
    for section in [
        "EXIT STATUS",
        "FILES",
        "ENVIRONMENT",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(page.contains(&format!(".SH \"{section}\"")), "{section}");
    }
    let protocol = fs::read_to_string(dir.path().join("man/ai-cmd-executor-protocol.7")).unwrap();
    assert!(
        protocol.starts_with(".TH AI-CMD-EXECUTOR-PROTOCOL 7"),
        "{protocol}"
    );
    assert!(protocol.contains(".SS \"Finding the spool\""), "{protocol}");
    assert!(protocol.contains(".SH \"RESULT FILE"), "{protocol}");
}

/// A spool this user may not use says "permission denied", not "not a
/// spool" (as root: the command runs as an unprivileged uid).
#[test]
fn permission_denied_on_a_spool_says_so() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("NOTICE: permission_denied_on_a_spool_says_so needs root; skipped");
        return;
    }
    let spool = Spool::new();
    let w = spool.start("");
    drop(w);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(spool.path("pending"), fs::Permissions::from_mode(0o700)).unwrap();
    // The test's own temporary directory (0700) must be reachable for the
    // uid; nothing above it is touched.
    let scratch = spool.root().parent().unwrap().to_owned();
    fs::set_permissions(&scratch, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(spool.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "60001",
            "--regid",
            "60001",
            "--clear-groups",
            BIN,
        ])
        .arg("--spool")
        .arg(spool.root())
        .args(["submit", "--", "true"])
        .env_remove("AI_CMD_EXECUTOR_SPOOL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(said.contains("permission denied"), "{said}");
    assert!(!said.contains("not a spool"), "{said}");
}

/// A job that could not be started at all exits 127 (the result says why),
/// never 1, which a job's own failure gives.
#[test]
fn a_job_that_could_not_start_exits_127() {
    let spool = Spool::new();
    let missing = spool.scratch("no-such-shell");
    let _w = spool.start(&format!("shell = \"{}\"\n", missing.display()));
    let out = spool.cli(&["submit", "--id", "nostart", "--wait", "--", "true"]);
    assert_eq!(out.status.code(), Some(127), "{}", stdout(&out));
    let r = spool.wait_result("nostart");
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["exit_code"], serde_json::Value::Null, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("could not start the job"),
        "{r}"
    );
}

/// `mcp` hands over to `ai-cmd-executor-mcp` beside the binary (the
/// worker does not map the MCP SDK); without it, the error says where it
/// was looked for. With it, the process `mcp` started is the server.
#[test]
fn mcp_starts_the_server_installed_beside_it() {
    let spool = Spool::new();
    let alone = tempfile::tempdir().unwrap();
    let copy = alone.path().join("ai-cmd-executor");
    // Copied by `cp`, not here: a child another test forks while this
    // process holds the copy open for writing would keep it open, and
    // running the copy would fail with ETXTBSY.
    let copied = Command::new("cp").arg(BIN).arg(&copy).status().unwrap();
    assert!(copied.success());
    let out = Command::new(&copy)
        .args(["--spool", spool.root().to_str().unwrap(), "mcp"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    let expected = format!(
        "starting the MCP server {}",
        alone.path().join("ai-cmd-executor-mcp").display()
    );
    assert!(text.contains(&expected), "{text}");

    // The real one answers `initialize` on stdout, in the same process,
    // which logs where the command line said.
    let mut child = Command::new(BIN)
        .args(["--log-target", "stderr", "--spool"])
        .args([spool.root().to_str().unwrap(), "mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    use std::io::{BufRead, Write};
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{init}").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"serverInfo\""), "{line}");
    let exe = fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
    assert!(exe.ends_with("ai-cmd-executor-mcp"), "{}", exe.display());
    let cmdline = fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(args.contains(&&b"--log-target=stderr"[..]), "{args:?}");
    drop(stdin);
    let end = child.wait_with_output().unwrap();
    assert!(end.status.success(), "{}", stderr(&end));
}

/// A reader that goes away early (`list | head -1`): the command ends
/// quietly by SIGPIPE, as other Unix tools do, and prints no panic.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let spool = Spool::new();
    let worker = spool.start("");
    for i in 0..3 {
        spool.submit(&format!("piped-{i}"), "seq 1 100000");
    }
    for i in 0..3 {
        spool.wait_result(&format!("piped-{i}"));
    }
    drop(worker);
    let root = spool.root();
    for args in [&["list"][..], &["log", "piped-0"], &["status"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .arg("--spool")
            .arg(&root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(
            out.status.signal(),
            Some(13),
            "{args:?}: {:?} {err}",
            out.status
        );
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}
