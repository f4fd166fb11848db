//! Child processes that never outlive the test that started them.
//!
//! Every child runs in its own process group and is registered with a *reaper*: a small shell
//! process in a session of its own that reads registrations from a pipe whose write end only this
//! process holds. When this process ends -- normally, by panic, or by SIGKILL -- the pipe closes,
//! the reaper reads EOF and kills every registered group, then removes registered directories.
//! A `Proc` dropped earlier (a test that finished) kills its group at once and unregisters it,
//! so a recycled PID is never signalled.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

use crate::Error;

const REAPER_SCRIPT: &str = r#"
# Servers such as sshd move per-connection children into sessions of their own: kill the whole
# tree below each group leader, not just the group.
tree() { local c; for c in $(cat /proc/$1/task/*/children 2>/dev/null); do tree "$c"; done; echo "$1"; }
declare -A groups dirs cgroups
while read -r verb arg; do
  case $verb in
    cgroup) cgroups[$arg]=1 ;;
    uncgroup) unset "cgroups[$arg]" ;;
    add) groups[$arg]=1 ;;
    del) unset "groups[$arg]" ;;
    dir) dirs[$arg]=1 ;;
    undir) unset "dirs[$arg]" ;;
  esac
done
pids=()
for pg in "${!groups[@]}"; do pids+=($(tree "$pg")); kill -TERM -- "-$pg" 2>/dev/null; done
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
sleep 1
for pg in "${!groups[@]}"; do kill -KILL -- "-$pg" 2>/dev/null; done
for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
for d in "${!dirs[@]}"; do rm -rf -- "$d"; done
# cgroupfs directories go with rmdir only, children first, once their processes are gone (a
# loaded machine can take seconds to finish killing a node's containers).
# Whatever still runs in them (a container whose namespace has not been torn down yet) is killed.
for _ in $(seq 1 300); do
  left=0
  for cg in "${!cgroups[@]}"; do
    [[ -d $cg ]] || continue
    left=1
    for p in $(cat $(find "$cg" -name cgroup.procs) 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  ((left)) || break
  sleep 0.1
done
"#;

struct Reaper {
    stdin: Mutex<ChildStdin>,
    // Kept so the reaper's own PID is known; it exits by itself at EOF.
    _child: Child,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C or a kill of the test's group must not take it down first.
            .process_group(0)
            .spawn()
            .expect("the test ground needs bash to start its process reaper");
        let stdin = child.stdin.take().expect("piped stdin");
        Reaper { stdin: Mutex::new(stdin), _child: child }
    })
}

fn tell_reaper(line: &str) {
    let mut stdin = reaper().stdin.lock().unwrap_or_else(|p| p.into_inner());
    // A write error means the reaper is gone; nothing better to do than carry on.
    let _ = writeln!(stdin, "{line}");
    let _ = stdin.flush();
}

/// Removes `dir` when this process exits, however it exits.
pub fn remove_at_exit(dir: &Path) {
    tell_reaper(&format!("dir {}", dir.display()));
}

/// Forgets a directory registered with [`remove_at_exit`] (used when it is handed to a person).
pub fn keep_at_exit(dir: &Path) {
    tell_reaper(&format!("undir {}", dir.display()));
}

/// Removes the cgroup directory `dir` (and every cgroup below it) when this process exits.
pub fn remove_cgroup_at_exit(dir: &Path) {
    tell_reaper(&format!("cgroup {}", dir.display()));
}

/// Forgets a cgroup registered with [`remove_cgroup_at_exit`] (it was removed already).
pub fn forget_cgroup_at_exit(dir: &Path) {
    tell_reaper(&format!("uncgroup {}", dir.display()));
}

/// A running child process in its own process group, with stdout and stderr in a log file.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    command_line: String,
}

impl Proc {
    /// Starts `cmd` in a new process group with its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, Error> {
        let command_line = format!("{cmd:?}");
        let out = File::options().create(true).append(true).open(log).map_err(|e| Error::io(log, e))?;
        let err = out.try_clone().map_err(|e| Error::io(log, e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        // Registering before spawning is impossible (no PID yet); the window between spawn and
        // registration is a few microseconds, and the reaper is started first so it exists.
        reaper();
        let child = cmd.spawn().map_err(|e| Error::Spawn { name: name.to_string(), source: e })?;
        tell_reaper(&format!("add {}", child.id()));
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf(), command_line })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        Err(Error::Exited { name: self.name.clone(), log: self.log.clone(), tail: self.log_tail(40) })
    }

    /// The last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Sends SIGTERM to the group and every descendant, waits up to `grace`, then SIGKILLs
    /// them. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = Pid::from_raw(child.id() as i32);
        // sshd, for one, puts each connection's process into a session of its own.
        let descendants = descendants(child.id());
        if matches!(child.try_wait(), Ok(None)) {
            let _ = killpg(pgid, Signal::SIGTERM);
            for &pid in &descendants {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The leader may be gone while other members of its group (sshd's per-connection
        // children, say) are not: always kill the whole group.
        let _ = killpg(pgid, Signal::SIGKILL);
        for &pid in &descendants {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = child.wait();
        tell_reaper(&format!("del {}", child.id()));
    }

    /// Sends `signal` to the process (not its group).
    pub fn signal(&self, signal: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), signal);
        }
    }

    /// Waits up to `timeout` for the process to exit; its status if it did. The group is
    /// stopped either way when the `Proc` is dropped.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the group at once: a crash, for fault tests.
    pub fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_millis(500));
    }
}

/// Every process below `pid` (children first, recursively), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            out.extend(descendants(child));
            out.push(child);
        }
    }
    out
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = String::new();
    let _ = f.read_to_string(&mut buf);
    let mut tail: VecDeque<&str> = VecDeque::with_capacity(lines);
    for line in buf.lines() {
        if tail.len() == lines {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into_iter().collect::<Vec<_>>().join("\n")
}

/// Processes started together and stopped together, newest first, each logging to
/// `<dir>/<name>.log`: the control plane's, the real node's.
pub struct ProcGroup {
    dir: PathBuf,
    procs: Mutex<Vec<Proc>>,
}

impl ProcGroup {
    pub fn new(dir: &Path) -> ProcGroup {
        ProcGroup { dir: dir.to_path_buf(), procs: Mutex::new(Vec::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Proc>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn spawn(&self, name: &str, cmd: Command) -> Result<(), Error> {
        let proc = Proc::spawn(name, cmd, &self.dir.join(format!("{name}.log")))?;
        self.lock().push(proc);
        Ok(())
    }

    /// Fails (with the log tail) if any process of the group has exited.
    pub fn check_running(&self) -> Result<(), Error> {
        self.lock().iter_mut().try_for_each(|p| p.check_running())
    }

    /// (name, PID) of each process, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.lock().iter().map(|p| (p.name().to_string(), p.pid())).collect()
    }

    /// Stops every process, the newest first (SIGTERM, then SIGKILL after `grace`).
    pub fn stop(&self, grace: Duration) {
        let mut procs = self.lock();
        while let Some(mut p) = procs.pop() {
            p.stop(grace);
        }
    }
}

/// How long each part of a start took, for the log a person reads.
#[derive(Debug, Clone)]
pub struct StartTimes {
    parts: Vec<(String, Duration)>,
    since: Instant,
}

impl Default for StartTimes {
    fn default() -> Self {
        StartTimes { parts: Vec::new(), since: Instant::now() }
    }
}

impl StartTimes {
    /// Records the time since the previous lap (or since creation) as `what`.
    pub fn lap(&mut self, what: &str) {
        self.parts.push((what.to_string(), self.since.elapsed()));
        self.since = Instant::now();
    }
}

impl std::fmt::Display for StartTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.parts.iter().map(|(what, d)| format!("{what} {:.2}s", d.as_secs_f32())).collect();
        f.write_str(&parts.join(", "))
    }
}
