//! Signals without a handler: the signals a mode cares about are blocked before any thread is
//! started (threads inherit the mask), and one thread takes them with sigwait(3). Blocked
//! signals are queued even for PID 1 of a PID namespace, which drops signals whose action is
//! the default -- a container's entrypoint is such a process.
//!
//! std links the C library already (musl, statically); these are its functions, declared here
//! so that the crate needs no dependency. Linux numbering.

use std::io;

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;
pub const SIGCHLD: i32 = 17;

const SIG_BLOCK: i32 = 0;
const WNOHANG: i32 = 1;

/// sigset_t: 1024 bits in both musl and glibc.
#[repr(C)]
struct SigSet([u64; 16]);

unsafe extern "C" {
    fn sigemptyset(set: *mut SigSet) -> i32;
    fn sigaddset(set: *mut SigSet, signal: i32) -> i32;
    fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigwait(set: *const SigSet, signal: *mut i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

/// Signals blocked in the thread that blocked them and in every thread it starts afterwards.
pub struct Blocked(SigSet);

impl Blocked {
    pub fn block(signals: &[i32]) -> io::Result<Self> {
        let mut set = SigSet([0; 16]);
        // SAFETY: `set` is a valid, writable sigset_t for the duration of each call.
        unsafe {
            if sigemptyset(&mut set) != 0 {
                return Err(io::Error::last_os_error());
            }
            for &signal in signals {
                if sigaddset(&mut set, signal) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let error = pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut());
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error));
            }
        }
        Ok(Blocked(set))
    }

    /// Waits for one of the blocked signals and returns its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut signal = 0;
        // SAFETY: `self.0` is an initialised sigset_t and `signal` a writable int.
        let error = unsafe { sigwait(&self.0, &mut signal) };
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error));
        }
        Ok(signal)
    }
}

/// Reaps every child that has exited, without waiting for the others; returns how many.
pub fn reap_children() -> usize {
    let mut reaped = 0;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a writable int; WNOHANG makes the call return at once.
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid <= 0 {
            return reaped; // 0: children left, none exited; -1: no children (ECHILD)
        }
        reaped += 1;
    }
}

pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGCHLD => "SIGCHLD",
        _ => "a signal",
    }
}
