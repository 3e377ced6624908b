//! Stable storage, checked on the system calls of a real process: a child process publishes
//! with confirms, acks and syncs, declares a durable queue and publishes a body large enough
//! for sled to keep it in a blob file, under `strace`; after each answer (a confirm, a
//! `Broker::sync`, a declare) it writes a marker line. The parent reads the trace and checks
//! that before every marker, every write to a file of the store was followed by an
//! `fsync`/`fdatasync` of that file, and every file created or renamed in the store by an
//! `fsync` of its directory (DESIGN.md "Durability": an answer means on stable storage, which
//! `sync_file_range` alone is not).
//!
//! The child also compacts the store twice (generation 0 to `gen-1`, then `gen-1`, holding the
//! blob, to `gen-2`), each answered with a marker too: the new generation's files, its
//! directory, `CURRENT` and the store directory must all be synced before the answer. A file
//! or directory removed before a marker need not be (the old generation, which may still be
//! written as it closes after the switch, is removed then).
//!
//! One file is checked differently: the commit file (`coney.commit`), which records the last
//! commit counter a flush made durable so that a log which lost writes is detected on open. It
//! may lag the log without harm (a lagging counter only weakens that check), so a flush writes
//! it without an fsync and syncs it at most once a second, and the store syncs it when it
//! closes: its writes are not checked before each answer, only at the end of the trace, after
//! the child has closed the store, where none may be left unsynced.
//!
//! The child is this test binary re-run with `CONEY_FSYNC_DIR` set. `strace` comes from
//! Debian's package of that name; without it the test says so and passes, unless
//! `CONEY_REQUIRE_STRACE` is set (CI sets it).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use coney::store::{SledOptions, SledStore};
use coney::*;

const QUEUE: &str = "work";

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Writes a marker line: in the trace, a `write` to fd 1 whose text starts with `MARK`.
fn mark(what: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "MARK {what}").unwrap();
    out.flush().unwrap();
}

#[test]
fn fsync_child() {
    let Ok(dir) = std::env::var("CONEY_FSYNC_DIR") else {
        return; // not a child run
    };
    let per_message = std::env::var("CONEY_FSYNC_MODE").as_deref() == Ok("per-message");
    // No sled flusher thread: its timed writes would race with the markers. Every write then
    // comes from the broker's own applies and flushes.
    let store = SledStore::open(
        &dir,
        SledOptions {
            flush_every_ms: None,
            ..SledOptions::default()
        },
    )
    .unwrap();
    let mode = if per_message {
        Durability::PerMessage
    } else {
        Durability::GroupCommit
    };
    let broker = Broker::builder()
        .durability(mode)
        .open_store(store)
        .unwrap();
    let conn = broker.connect();
    let ch = conn.channel().unwrap();
    ch.queue_declare(QUEUE, durable(), FieldTable::new())
        .unwrap();
    mark("declared");
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    for round in 0..5 {
        for i in 0..20u32 {
            ch.basic_publish(
                "",
                QUEUE,
                BasicPublishOptions::default(),
                i.to_le_bytes().to_vec(),
                persistent(),
            )
            .unwrap();
            if per_message {
                assert!(ch.wait_for_confirms().unwrap());
                mark("confirmed one");
            }
        }
        assert!(ch.wait_for_confirms().unwrap());
        mark(&format!("confirmed round {round}"));
        for _ in 0..10 {
            let got = ch.basic_get(QUEUE, BasicGetOptions::default()).unwrap();
            got.expect("a message")
                .delivery
                .ack(BasicAckOptions::default())
                .unwrap();
        }
        broker.sync().unwrap();
        mark(&format!("synced acks of round {round}"));
        if round == 2 {
            // The first compaction: generation 0 (the store directory) to gen-1.
            broker.compact_store().unwrap();
            mark("compacted");
        }
    }
    // Over sled's blob threshold (a quarter of a 512 KiB segment): kept in its own file.
    ch.basic_publish(
        "",
        QUEUE,
        BasicPublishOptions::default(),
        vec![7u8; 300 * 1024],
        persistent(),
    )
    .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    mark("confirmed blob");
    ch.queue_declare("second", durable(), FieldTable::new())
        .unwrap();
    mark("declared second");
    // A later one, copying the blob: gen-1 to gen-2.
    broker.compact_store().unwrap();
    mark("compacted again");
    ch.basic_publish(
        "",
        QUEUE,
        BasicPublishOptions::default(),
        b"after".to_vec(),
        persistent(),
    )
    .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    mark("confirmed after compacting");
}

/// One system call as the trace shows it.
#[derive(Debug)]
struct Call {
    pid: u32,
    name: String,
    /// The text between the parentheses (for an unfinished call, what strace printed of it).
    args: String,
    /// What it returned, when it returned.
    result: Option<String>,
}

/// Parses `strace -f -y` output into completed calls in the order they *started*, each with
/// the index of the line where it started and where it ended.
fn parse(trace: &str) -> Vec<(usize, usize, Call)> {
    let mut calls = Vec::new();
    let mut open: HashMap<u32, (usize, Call)> = HashMap::new();
    for (index, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<u32>() else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            // "<... name resumed>...) = result"
            let Some((start, mut call)) = open.remove(&pid) else {
                continue;
            };
            let tail = resumed.split_once("resumed>").map_or("", |(_, t)| t);
            call.args.push_str(tail);
            call.result = result_of(tail);
            calls.push((start, index, call));
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue; // signals, exits
        };
        if let Some(args) = args.strip_suffix(" <unfinished ...>") {
            open.insert(
                pid,
                (
                    index,
                    Call {
                        pid,
                        name: name.to_owned(),
                        args: args.to_owned(),
                        result: None,
                    },
                ),
            );
            continue;
        }
        let result = result_of(args);
        calls.push((
            index,
            index,
            Call {
                pid,
                name: name.to_owned(),
                args: args.to_owned(),
                result,
            },
        ));
    }
    calls.sort_by_key(|(start, _, _)| *start);
    calls
}

/// What a call returned: the text after its closing parenthesis and `=`, which strace pads
/// with spaces to align short lines (`) = 0`, `)          = 0`).
fn result_of(text: &str) -> Option<String> {
    let at = text.rfind(" = ")?;
    text[..at]
        .trim_end()
        .ends_with(')')
        .then(|| text[at + 3..].trim().to_owned())
}

/// The path strace -y printed for the first (fd) argument: `5</tmp/x/db>` gives `/tmp/x/db`.
fn fd_path(args: &str) -> Option<&str> {
    let open = args.find('<')?;
    let close = args[open..].find('>')? + open;
    Some(&args[open + 1..close])
}

/// The path an `unlink`, `unlinkat` or `rmdir` removed: its quoted path, absolute or relative
/// to the descriptor before it (`unlinkat(8</s/gen-1/blobs>, "12", 0)` gives `/s/gen-1/blobs/12`).
fn removed_path(args: &str) -> Option<String> {
    let name = args.split('"').nth(1)?;
    if name.starts_with('/') {
        return Some(name.to_owned());
    }
    Some(format!("{}/{name}", fd_path(args)?))
}

/// The path an `openat` returned a descriptor for (`= 9</tmp/x/blobs/12>`).
fn opened_path(result: &str) -> Option<&str> {
    fd_path(result)
}

/// What is not yet durable at a point of the trace.
#[derive(Default)]
struct Pending {
    /// File -> line after which it was last written.
    files: HashMap<String, usize>,
    /// Directory -> line after which an entry of it was last created or renamed.
    dirs: HashMap<String, usize>,
}

impl Pending {
    /// Fails if anything is pending but commit files and the directories in `except`.
    fn assert_clean(&self, except: &[&str], pid: u32, line: usize, what: &str) {
        self.assert_clean_where(except, |_| true, pid, line, what);
    }

    /// [`Pending::assert_clean`] over the paths `relevant` keeps only.
    fn assert_clean_where(
        &self,
        except: &[&str],
        relevant: impl Fn(&str) -> bool,
        pid: u32,
        line: usize,
        what: &str,
    ) {
        let dirty: Vec<_> = self
            .files
            .keys()
            .filter(|path| !is_commit_file(path))
            .chain(
                self.dirs
                    .keys()
                    .filter(|path| !except.contains(&path.as_str())),
            )
            .filter(|path| relevant(path))
            .collect();
        assert!(
            dirty.is_empty(),
            "pid {pid}: {what} at trace line {} while {dirty:?} were written or had entries \
             created with no fsync since",
            line + 1
        );
    }
}

/// The number of a generation directory's path (`.../gen-12` gives 12; anything else 0).
fn generation_number(path: &str) -> u64 {
    path.rsplit_once("/gen-")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

fn parent(path: &str) -> String {
    Path::new(path)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `path` is a commit file of the store (see the module doc): `coney.commit` in the
/// store directory or in one of its generations.
fn is_commit_file(path: &str) -> bool {
    path.ends_with("/coney.commit")
}

/// Checks the trace; returns (markers, store writes, syncs, switches of `CURRENT`) seen.
fn check(trace: &str, dir: &Path) -> (u32, u32, u32, u32) {
    let dir = dir.to_string_lossy().into_owned();
    let in_store = |path: &str| path == dir || path.starts_with(&format!("{dir}/"));
    let mut pending = Pending::default();
    let (mut markers, mut writes, mut syncs, mut switches) = (0, 0, 0, 0);
    let (current, current_tmp) = (format!("{dir}/CURRENT"), format!("{dir}/CURRENT.tmp"));
    // The generation directory most recently created (the one a switch names).
    let mut newest = String::new();
    // What a switch to `newest` must have on stable storage: its files and directories, and
    // the store directory's own entries.
    let switching_to = |path: &str, newest: &String| {
        path == dir
            || (!newest.is_empty() && (path == newest || path.starts_with(&format!("{newest}/"))))
    };
    // Events in line order: a write counts from its end (its data may land at any moment
    // before that), a sync covers what was pending before its start and takes effect at its
    // end, a marker is checked at its start.
    let calls = parse(trace);
    let mut events: Vec<(usize, &str, &Call, usize)> = Vec::new();
    for (start, end, call) in &calls {
        events.push((*start, "start", call, *start));
        events.push((*end, "end", call, *start));
    }
    events.sort_by_key(|(line, phase, _, _)| (*line, *phase == "start"));
    for (line, phase, call, start) in events {
        let ok = call.result.as_deref().is_some_and(|r| !r.starts_with('-'));
        // The highest-numbered generation named so far is the one a switch goes to.
        for generation in call.args.split(&format!("{dir}/gen-")).skip(1) {
            let digits: String = generation
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let named = format!("{dir}/gen-{digits}");
            if !digits.is_empty() && generation_number(&named) > generation_number(&newest) {
                newest = named;
            }
        }
        match (call.name.as_str(), phase) {
            ("write", "start") if call.args.starts_with("1<") && call.args.contains("\"MARK") => {
                markers += 1;
                let text = call.args.split('"').nth(1).unwrap_or_default();
                pending.assert_clean(&[], call.pid, line, &format!("{text:?} answered"));
            }
            ("write" | "writev" | "pwrite64" | "pwritev" | "pwritev2", "end") => {
                if let Some(path) = fd_path(&call.args).filter(|p| in_store(p)) {
                    writes += 1;
                    pending.files.insert(path.to_owned(), line);
                }
            }
            ("fsync" | "fdatasync", "end") if ok => {
                if let Some(path) = fd_path(&call.args).filter(|p| in_store(p)) {
                    syncs += 1;
                    if pending.files.get(path).is_some_and(|w| *w < start) {
                        pending.files.remove(path);
                    }
                    if pending.dirs.get(path).is_some_and(|w| *w < start) {
                        pending.dirs.remove(path);
                    }
                }
            }
            ("syncfs" | "sync", "end") if ok => {
                pending.files.retain(|_, w| *w >= start);
                pending.dirs.retain(|_, w| *w >= start);
            }
            ("openat" | "creat", "end") if ok && call.args.contains("O_CREAT") => {
                if let Some(path) = call.result.as_deref().and_then(opened_path)
                    && in_store(path)
                {
                    if path == current_tmp {
                        // Everything of the new generation synced, its directory's entry in the
                        // store directory too, before `CURRENT` is written at all. The
                        // generation being retired is not checked: reading it to copy it may make
                        // sled rewrite a page of it, which nothing will ever read again.
                        pending.assert_clean_where(
                            &[],
                            |p| switching_to(p, &newest),
                            call.pid,
                            line,
                            "CURRENT.tmp created",
                        );
                    }
                    pending.dirs.insert(parent(path), line);
                }
            }
            ("rename" | "renameat" | "renameat2", "start")
                if call.args.split('"').nth(3) == Some(current.as_str()) =>
            {
                // The switch of a compaction: the generation it names (and `CURRENT.tmp`) on
                // stable storage before; the store directory's new entries are covered by its
                // sync after the rename (they were all synced before `CURRENT.tmp`, see below).
                switches += 1;
                pending.assert_clean_where(
                    &[&dir],
                    |p| switching_to(p, &newest),
                    call.pid,
                    line,
                    "CURRENT renamed",
                );
            }
            ("unlink" | "unlinkat" | "rmdir", "end") if ok => {
                // A removed file or directory need not reach stable storage (a compaction's
                // old generation, closed after the switch, may write as it closes).
                if let Some(removed) = removed_path(&call.args).filter(|p| in_store(p)) {
                    let under = format!("{removed}/");
                    let gone = |path: &String| *path == removed || path.starts_with(&under);
                    pending.files.retain(|path, _| !gone(path));
                    pending.dirs.retain(|path, _| !gone(path));
                }
            }
            ("mkdir" | "mkdirat" | "rename" | "renameat" | "renameat2", "end") if ok => {
                // Paths of these are quoted strings, relative to a descriptor or absolute. (The
                // store directory's own creation is its parent's business, not the store's.)
                for quoted in call.args.split('"').skip(1).step_by(2) {
                    if in_store(quoted) && in_store(&parent(quoted)) {
                        pending.dirs.insert(parent(quoted), line);
                    }
                }
            }
            _ => {}
        }
    }
    let lagging: Vec<_> = pending
        .files
        .keys()
        .filter(|path| is_commit_file(path))
        .collect();
    assert!(
        lagging.is_empty(),
        "the commit file {lagging:?} was written and not synced before the store closed"
    );
    (markers, writes, syncs, switches)
}

fn strace() -> Option<PathBuf> {
    let found = Command::new("strace").arg("-V").output();
    match found {
        Ok(out) if out.status.success() => Some(PathBuf::from("strace")),
        _ => {
            assert!(
                std::env::var_os("CONEY_REQUIRE_STRACE").is_none(),
                "strace is required (CONEY_REQUIRE_STRACE is set) but was not found"
            );
            eprintln!("skipped: strace not found (apt-get install strace)");
            None
        }
    }
}

fn run_traced(mode: &str, expected_markers: u32) {
    let Some(strace) = strace() else { return };
    let base = std::env::temp_dir().join(format!("coney-fsync-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // The store path as the kernel reports it, so it matches strace's -y paths.
    let base = base.canonicalize().unwrap();
    let dir = base.join("store");
    let trace_file = base.join("trace");
    let status = Command::new(strace)
        .args(["-f", "-y", "-qq", "-s", "40", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,\
             write,writev,pwrite64,pwritev,pwritev2,fsync,fdatasync,sync_file_range,syncfs,sync",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["fsync_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("CONEY_FSYNC_DIR", &dir)
        .env("CONEY_FSYNC_MODE", mode)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the traced child failed: {status}");
    let trace = std::fs::read_to_string(&trace_file).unwrap();
    let (markers, writes, syncs, switches) = check(&trace, &dir);
    assert_eq!(switches, 2, "both compactions switched generations");
    assert_eq!(markers, expected_markers, "every answer left a marker");
    assert!(writes > 0, "the trace shows writes to the store");
    assert!(syncs > 0, "the trace shows syncs of the store");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn group_commit_answers_only_after_fsync() {
    // declared, 5 x (confirmed round, synced acks), compacted, confirmed blob, declared
    // second, compacted again, confirmed after compacting
    run_traced("group", 1 + 5 * 2 + 1 + 2 + 2);
}

#[test]
fn per_message_confirms_only_after_fsync() {
    run_traced("per-message", 1 + 5 * (20 + 2) + 1 + 2 + 2);
}

#[test]
fn the_checker_sees_a_write_left_unsynced() {
    let trace = "\
10 openat(AT_FDCWD</>, \"/s/db\", O_RDWR|O_CREAT, 0644) = 3</s/db>
10 fsync(4</s>) = 0
10 pwrite64(3</s/db>, \"x\", 1, 0) = 1
10 sync_file_range(3</s/db>, 0, 1, SYNC_FILE_RANGE_WAIT_BEFORE) = 0
10 write(1<pipe:[9]>, \"MARK confirmed\\n\", 15) = 15
";
    let outcome = std::panic::catch_unwind(|| check(trace, Path::new("/s")));
    let message = *outcome
        .expect_err("a write with no fsync before the marker fails the check")
        .downcast::<String>()
        .unwrap();
    assert!(message.contains("/s/db"), "{message}");
    // The same with an fdatasync, on another descriptor of the file, in between passes.
    let synced = trace.replace(
        "10 write(1",
        "11 fdatasync(7</s/db> <unfinished ...>\n11 <... fdatasync resumed>)          = 0\n10 write(1",
    );
    assert_eq!(check(&synced, Path::new("/s")), (1, 1, 2, 0));
}

#[test]
fn the_checker_forgets_what_was_removed() {
    let trace = "\
10 pwrite64(3</s/gen-1/db>, \"x\", 1, 0) = 1
10 openat(AT_FDCWD</>, \"/s/gen-1/blobs/7\", O_WRONLY|O_CREAT|O_EXCL, 0666) = 4</s/gen-1/blobs/7>
10 unlinkat(5</s/gen-1/blobs>, \"7\", 0) = 0
10 unlinkat(6</s>, \"gen-1\", AT_REMOVEDIR) = 0
10 write(1<pipe:[9]>, \"MARK compacted\\n\", 15) = 15
";
    assert_eq!(check(trace, Path::new("/s")), (1, 1, 0, 0));
    let kept = trace.replace("10 unlinkat(6</s>, \"gen-1\", AT_REMOVEDIR) = 0\n", "");
    let outcome = std::panic::catch_unwind(|| check(&kept, Path::new("/s")));
    assert!(outcome.is_err(), "the write to gen-1/db is still pending");
}

#[test]
fn the_checker_sees_a_generation_unsynced_at_the_switch() {
    let trace = "\
10 pwrite64(3</s/gen-1/db>, \"x\", 1, 0) = 1
10 openat(AT_FDCWD</>, \"/s/CURRENT.tmp\", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 4</s/CURRENT.tmp>
10 write(4</s/CURRENT.tmp>, \"gen-1\", 5) = 5
10 fsync(4</s/CURRENT.tmp>) = 0
10 rename(\"/s/CURRENT.tmp\", \"/s/CURRENT\") = 0
10 fsync(5</s>) = 0
10 fdatasync(3</s/gen-1/db>) = 0
10 write(1<pipe:[9]>, \"MARK compacted\\n\", 15) = 15
";
    let outcome = std::panic::catch_unwind(|| check(trace, Path::new("/s")));
    let message = *outcome
        .expect_err("a generation synced only after the switch fails the check")
        .downcast::<String>()
        .unwrap();
    assert!(message.contains("CURRENT.tmp created"), "{message}");
    let synced = trace.replace(
        "10 openat(AT_FDCWD</>, \"/s/CURRENT.tmp",
        "10 fdatasync(3</s/gen-1/db>) = 0\n10 openat(AT_FDCWD</>, \"/s/CURRENT.tmp",
    );
    assert_eq!(check(&synced, Path::new("/s")), (1, 2, 4, 1));
}

#[test]
fn the_checker_lets_the_commit_file_lag_until_the_store_closes() {
    let trace = "\
10 pwrite64(3</s/coney.commit>, \"x\", 20, 0) = 20
10 write(1<pipe:[9]>, \"MARK confirmed\\n\", 15) = 15
";
    let outcome = std::panic::catch_unwind(|| check(trace, Path::new("/s")));
    let message = *outcome
        .expect_err("a commit file never synced fails the check at the end")
        .downcast::<String>()
        .unwrap();
    assert!(message.contains("commit file"), "{message}");
    let synced = format!("{trace}10 fdatasync(3</s/coney.commit>) = 0\n");
    assert_eq!(check(&synced, Path::new("/s")), (1, 1, 1, 0));
}
