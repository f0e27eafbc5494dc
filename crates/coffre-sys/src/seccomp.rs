//! A seccomp filter for the helpers that parse guests' bytes (the NFS,
//! LDAP and DHCP servers): the system calls that open the kernel's
//! widest attack surface, or a way out of the helper's sandbox, are
//! refused with `EPERM`, whatever the process's user and capabilities.
//!
//! A deny list, not an allow list: the helpers run on the host's glibc,
//! whose choice of system calls changes between versions (a missing entry
//! in an allow list would take a server down in the middle of a guest's
//! work); what is denied here is what a taken-over helper would reach
//! for, never what a server does:
//!
//! - new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*`
//!   flag): an unprivileged user namespace gives back every capability
//!   inside it, and the kernel's code behind them; `clone3`, whose flags a
//!   filter cannot read, answers `ENOSYS` so that glibc falls back to
//!   `clone` for its threads;
//! - mounts of every kind, `chroot`, `pivot_root`;
//! - `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*`, the key
//!   rings, `fanotify_init`: the usual first steps of a kernel exploit;
//! - `ptrace`, `process_vm_readv`/`writev`, `kcmp`, `pidfd_getfd`: other
//!   processes' memory and descriptors;
//! - `execve`, `execveat`: no program replaces a server;
//! - modules, `kexec`, `reboot`, swap, `acct`, `syslog`, `quotactl`,
//!   clocks, host and domain names, `personality`, the old `mknod`, x86's
//!   `iopl`/`ioperm`/`modify_ldt`, and obsolete calls (`uselib`,
//!   `nfsservctl`, `lookup_dcookie`);
//! - any new socket (`socket`, `socketpair`): each server is given its
//!   own; a new one could reach a UNIX socket by its path from any
//!   network namespace;
//! - a change of its own credentials (`set*uid`, `set*gid`), extended
//!   attributes, `fchmodat2` and the old path calls (`chmod`, `chown`...);
//! - `setsid` and `setpgid`: a helper stays in the process group the
//!   daemon kills it by (with whatever it forked);
//! - by argument: signals but to itself (the NFS broker: to its own
//!   process group too, `kill(0, ..)`), limits, scheduling and I/O
//!   priority but its own (the servers share a user), `clone` with a
//!   namespace flag, and for the NFS server `setfsuid`/`setfsgid` to
//!   anyone but the ids it is given ([`Acts`]), root never, and
//!   `mknodat` of anything but a FIFO or a socket's name (no device);
//! - `open_by_handle_at` and `name_to_handle_at` for all but the NFS
//!   server's handle broker (the only process that opens by handle);
//! - for all but the NFS server (LDAP, DHCP, the broker): `setfsuid`,
//!   `setfsgid`, `mknodat` and every mode, owner and time change;
//! - `setgroups` for an NFS server whose groups are fixed for its life
//!   ([`Acts::groups`]: a server per VM, acting as one user), set before
//!   the filter, and for its broker (given the same `Acts`), which never
//!   changes its groups.
//!
//! A call made through another ABI is no way around it: a system call of
//! another architecture (i386's `int 0x80` on x86-64) kills the process,
//! and on x86-64 every x32 system call number answers `ENOSYS`.
//!
//! The filter is classic BPF, built here (a deny list needs a range check
//! on the call's number, which the filter crates' rule tables do not
//! express), and applied to every thread of the process (`TSYNC`). It
//! needs `no_new_privs` (set by Landlock's confinement, or here).

use std::io;

/// Which helper the filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The NFS server: acts on the team's files as their users, by path;
    /// opens nothing by handle (its broker does).
    Nfs,
    /// The NFS server's handle broker: opens files by handle, changes
    /// none and acts as nobody else.
    NfsBroker,
    /// A helper with no file to open by handle (LDAP, DHCP).
    NoHandles,
}

// struct seccomp_data: nr (u32) at 0, arch (u32) at 4, instruction
// pointer (u64) at 8, args (6 × u64) from 16. Little-endian: an
// argument's low half is at its own offset.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LOW: u32 = 16;
#[cfg(not(target_endian = "little"))]
compile_error!("coffre_sys::seccomp reads the arguments' low halves at little-endian offsets");

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
/// x32's system call numbers on x86-64 are the call's number with this
/// bit set (and the same audit architecture).
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

/// The `CLONE_NEW*` flags (`CLONE_NEWTIME` shares its bit with
/// `CSIGNAL`'s range in `clone`, where it cannot be asked for).
const CLONE_NEW_ANY: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// The system calls refused with `EPERM` for `profile` (`clone` is
/// refused only with a `CLONE_NEW*` flag, `clone3` answers `ENOSYS`:
/// neither is listed).
pub fn denied(profile: Profile) -> Vec<(&'static str, i64)> {
    macro_rules! calls {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name), libc::$name as i64)),*]
        };
    }
    let mut v = calls![
        SYS_unshare,
        SYS_setns,
        SYS_setsid,
        SYS_setpgid,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount_setattr,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_fanotify_init,
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_kcmp,
        SYS_pidfd_getfd,
        SYS_execve,
        SYS_execveat,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_reboot,
        SYS_swapon,
        SYS_swapoff,
        SYS_acct,
        SYS_syslog,
        SYS_quotactl,
        SYS_quotactl_fd,
        SYS_settimeofday,
        SYS_clock_settime,
        SYS_clock_adjtime,
        SYS_adjtimex,
        SYS_sethostname,
        SYS_setdomainname,
        SYS_personality,
        SYS_vhangup,
        SYS_lookup_dcookie,
        // No socket of its own: each server is given its sockets, and a
        // socket made here could reach a UNIX socket by its path (the
        // network namespace does not cover those; Landlock ABI 6 does
        // not either).
        SYS_socket,
        SYS_socketpair,
        // Its credentials are set before the filter; never again.
        SYS_setuid,
        SYS_setgid,
        SYS_setreuid,
        SYS_setregid,
        SYS_setresuid,
        SYS_setresgid,
        // No extended attribute (no ACL given away).
        SYS_setxattr,
        SYS_lsetxattr,
        SYS_fsetxattr,
        SYS_removexattr,
        SYS_lremovexattr,
        SYS_fremovexattr,
        // Modes, owners and times only through the *at calls the NFS
        // server makes on its own descriptors' /proc paths (fchmodat2
        // reaches an O_PATH descriptor, which Landlock does not check).
        SYS_fchmodat2,
        SYS_vmsplice,
        SYS_process_madvise,
        // Signals go through kill and tgkill, to itself only (checked).
        SYS_tkill,
        // Priorities of a process group or a user's processes: none used.
        SYS_setpriority,
        SYS_ioprio_set,
        SYS_pidfd_open,
        SYS_pidfd_send_signal,
    ];
    // Newer than the libc crate's tables (numbered alike on every
    // architecture since Linux 5.1).
    v.extend([
        ("statmount", 457),
        ("listmount", 458),
        ("setxattrat", 463),
        ("removexattrat", 466),
        ("open_tree_attr", 467),
    ]);
    #[cfg(target_arch = "x86_64")]
    v.extend(calls![
        SYS_mknod,
        SYS_iopl,
        SYS_ioperm,
        SYS_modify_ldt,
        SYS_uselib,
        SYS_nfsservctl,
    ]);
    #[cfg(target_arch = "x86_64")]
    v.extend(calls![
        SYS_chmod,
        SYS_chown,
        SYS_lchown,
        SYS_utime,
        SYS_utimes,
        SYS_futimesat
    ]);
    if profile != Profile::NfsBroker {
        // Only the broker opens files by handle.
        v.extend(calls![SYS_open_by_handle_at, SYS_name_to_handle_at]);
    }
    if profile != Profile::Nfs {
        // No file to change, no one else to act as.
        v.extend(calls![
            SYS_mknodat,
            SYS_fchmod,
            SYS_fchmodat,
            SYS_fchown,
            SYS_fchownat,
            SYS_utimensat,
            SYS_setfsuid,
            SYS_setfsgid,
        ]);
    }
    v.sort_by_key(|(_, nr)| *nr);
    v.dedup_by_key(|(_, nr)| *nr);
    v
}

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const JGT_K: u16 = 0x05 | 0x20; // BPF_JMP | BPF_JGT | BPF_K
const JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Whom the NFS server may act as on files (`setfsuid`, `setfsgid`):
/// inclusive ranges. Root (0) never, even when a range includes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acts {
    /// The uids: its own and its VM's share user's.
    pub uids: Vec<(u32, u32)>,
    /// The gids, likewise.
    pub gids: Vec<(u32, u32)>,
    /// The supplementary groups it keeps for its life, set before the
    /// filter (a server that acts as one user): `setgroups` is then
    /// refused, so a server taken over cannot take on any other group
    /// (the filter cannot read a list of groups, only refuse the call).
    /// `None`: `setgroups` allowed (a server acting as several users).
    pub groups: Option<Vec<u32>>,
}

impl Acts {
    /// Reads `"5000-5999,1001"` (ranges and single ids).
    pub fn parse_ranges(s: &str) -> Result<Vec<(u32, u32)>, String> {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (a, b) = p.split_once('-').unwrap_or((p, p));
                let n = |x: &str| x.trim().parse::<u32>().map_err(|e| format!("{p:?}: {e}"));
                let (a, b) = (n(a)?, n(b)?);
                if a > b {
                    return Err(format!("{p:?}: empty range"));
                }
                Ok((a, b))
            })
            .collect()
    }

    /// Reads `"4242,5001"` (single ids; empty: none).
    pub fn parse_ids(s: &str) -> Result<Vec<u32>, String> {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.trim().parse::<u32>().map_err(|e| format!("{p:?}: {e}")))
            .collect()
    }

    /// Writes ranges as [`Acts::parse_ranges`] reads them.
    pub fn ranges_text(r: &[(u32, u32)]) -> String {
        r.iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Sorted, with overlapping and adjacent ranges merged.
    pub fn merged(r: &[(u32, u32)]) -> Vec<(u32, u32)> {
        let mut v = r.to_vec();
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some((_, hi)) if a <= hi.saturating_add(1) => *hi = (*hi).max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }
}

/// A call allowed or refused by the value of one argument (its low 32
/// bits: every argument checked here is an int, a pid, an id or flags).
struct Check {
    nr: i64,
    /// Which argument (0 to 5).
    arg: u32,
    rule: Rule,
}

enum Rule {
    /// Refused when any of these bits is set.
    RefuseAnyBit(u32),
    /// Refused when equal to any of these.
    RefuseEq(Vec<u32>),
    /// Allowed only within these inclusive ranges.
    AllowOnly(Vec<(u32, u32)>),
}

/// The most ranges one check may carry (its jumps stay within a block).
const MAX_RANGES: usize = 100;

/// The calls checked by argument:
/// - `clone` with a `CLONE_NEW*` flag or `CLONE_PARENT` is refused;
/// - signals (`kill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`)
///   only to this process, and no signal owner set on a descriptor
///   (`fcntl` `F_SETOWN`, `F_SETOWN_EX`, `F_SETSIG`; `ioctl` `FIOSETOWN`,
///   `SIOCSPGRP`); limits and scheduling (`prlimit64`, `sched_set*`)
///   only its own (the servers share a user: neither may touch another,
///   whatever Landlock's signal scope covers);
/// - for the NFS server, `setfsuid` and `setfsgid` only to `acts` (and
///   the "which is it now" query), never 0; without `acts`, all but 0.
/// - for the NFS server, `mknodat` of a FIFO or a socket's name only.
fn checked(profile: Profile, acts: Option<&Acts>, pid: u32) -> Result<Vec<Check>, String> {
    let me = vec![(pid, pid)];
    let me_or_0 = vec![(0, 0), (pid, pid)];
    let mut v = vec![
        Check {
            nr: libc::SYS_clone,
            arg: 0,
            rule: Rule::RefuseAnyBit(CLONE_NEW_ANY | libc::CLONE_PARENT.cast_unsigned()),
        },
        Check {
            nr: libc::SYS_fcntl,
            arg: 1,
            rule: Rule::RefuseEq(vec![
                libc::F_SETOWN.cast_unsigned(),
                15, // F_SETOWN_EX
                10, // F_SETSIG
            ]),
        },
        Check {
            nr: libc::SYS_ioctl,
            arg: 1,
            rule: Rule::RefuseEq(vec![0x8901, 0x8902]), // FIOSETOWN, SIOCSPGRP
        },
    ];
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        // The NFS broker may also kill its own process group (`kill(0,
        // ..)`): itself and the server it forked, which cannot leave it.
        let rule = if nr == libc::SYS_kill && profile == Profile::NfsBroker {
            Rule::AllowOnly(me_or_0.clone())
        } else {
            Rule::AllowOnly(me.clone())
        };
        v.push(Check { nr, arg: 0, rule });
    }
    for nr in [
        libc::SYS_prlimit64,
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setparam,
        libc::SYS_sched_setattr,
    ] {
        v.push(Check {
            nr,
            arg: 0,
            rule: Rule::AllowOnly(me_or_0.clone()),
        });
    }
    if profile == Profile::Nfs {
        let only = |r: &[(u32, u32)]| -> Result<Rule, String> {
            let mut r: Vec<(u32, u32)> = r
                .iter()
                .filter(|(_, b)| *b > 0)
                .map(|(a, b)| ((*a).max(1), *b))
                .collect();
            r.push((u32::MAX, u32::MAX));
            let r = Acts::merged(&r);
            if r.len() > MAX_RANGES {
                return Err(format!(
                    "{} id ranges to allow (at most {MAX_RANGES})",
                    r.len()
                ));
            }
            Ok(Rule::AllowOnly(r))
        };
        let (u, g) = match acts {
            Some(a) => (only(&a.uids)?, only(&a.gids)?),
            None => (Rule::RefuseEq(vec![0]), Rule::RefuseEq(vec![0])),
        };
        v.push(Check {
            nr: libc::SYS_setfsuid,
            arg: 0,
            rule: u,
        });
        v.push(Check {
            nr: libc::SYS_setfsgid,
            arg: 0,
            rule: g,
        });
        // FIFOs and sockets' names only (MKNOD), whatever their mode
        // bits; never a device (the kernel reads the mode's low 16 bits:
        // nothing above them is allowed either).
        v.push(Check {
            nr: libc::SYS_mknodat,
            arg: 2,
            rule: Rule::AllowOnly(vec![
                (libc::S_IFIFO, libc::S_IFIFO | 0o7777),
                (libc::S_IFSOCK, libc::S_IFSOCK | 0o7777),
            ]),
        });
    }
    Ok(v)
}

/// One instruction.
fn insn(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter's program for `profile`, refusing with `errno`. Every jump
/// lands within a few instructions: each test has its own returns right
/// after it, so the program may grow (to the kernel's 4096 instructions)
/// without a jump running out of its 8 bits.
fn program(profile: Profile, acts: Option<&Acts>, errno: i32) -> Result<Vec<Insn>, String> {
    let nr = |n: i64| u32::try_from(n).map_err(|_| format!("system call {n}"));
    let errno = u32::try_from(errno).map_err(|e| e.to_string())?;
    let refuse = stmt(RET_K, RET_ERRNO | errno);
    let enosys = stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32);
    let allow = stmt(RET_K, RET_ALLOW);
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        insn(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    // "If A matches, return `ret`; else go on."
    let unless = |p: &mut Vec<Insn>, code: u16, k: u32, ret: Insn| {
        p.push(insn(code, k, 0, 1));
        p.push(ret);
    };
    #[cfg(target_arch = "x86_64")]
    unless(&mut p, JGE_K, X32_SYSCALL_BIT, enosys);
    unless(&mut p, JEQ_K, nr(libc::SYS_clone3)?, enosys);
    for (_, n) in denied(profile) {
        unless(&mut p, JEQ_K, nr(n)?, refuse);
    }
    // Groups fixed for its life: no other.
    if acts.is_some_and(|a| a.groups.is_some()) {
        unless(&mut p, JEQ_K, nr(libc::SYS_setgroups)?, refuse);
    }
    // Each checked call: a block that ends in its own two returns; when
    // the call is another, the jump goes over the block with the
    // accumulator still holding its number.
    for c in checked(profile, acts, std::process::id())? {
        let load = stmt(LD_W_ABS, OFF_ARG0_LOW + 8 * c.arg);
        // Tests, then [RET ALLOW, RET refuse]; `to_allow(i)` and
        // `to_refuse(i)` are the offsets from test `i` of `n`.
        let mut body = vec![load];
        match c.rule {
            Rule::RefuseAnyBit(m) => {
                body.push(insn(JSET_K, m, 1, 0));
            }
            Rule::RefuseEq(values) => {
                let n = values.len();
                for (i, v) in values.into_iter().enumerate() {
                    // Equal: to the refusal, over the tests left and ALLOW.
                    let to_refuse = u8::try_from(n - i).map_err(|e| e.to_string())?;
                    body.push(insn(JEQ_K, v, to_refuse, 0));
                }
            }
            Rule::AllowOnly(ranges) => {
                let n = ranges.len();
                for (i, (lo, hi)) in ranges.into_iter().enumerate() {
                    // Below lo: over this range's second test; within:
                    // to ALLOW, over the tests left (2 per range) and the
                    // closing one.
                    let left = u8::try_from(2 * (n - i - 1) + 1).map_err(|e| e.to_string())?;
                    body.push(insn(JGE_K, lo, 0, 1));
                    body.push(insn(JGT_K, hi, 0, left));
                }
                // Within no range: over ALLOW to the refusal.
                body.push(insn(JEQ_K, 0, 1, 1));
            }
        }
        body.push(allow);
        body.push(refuse);
        let over = u8::try_from(body.len()).map_err(|_| "a check too long".to_string())?;
        p.push(insn(JEQ_K, nr(c.nr)?, 0, over));
        p.extend(body);
    }
    p.push(allow);
    if p.len() > 4096 {
        return Err(format!("{} instructions (the kernel takes 4096)", p.len()));
    }
    Ok(p)
}

/// Applies the filter for `profile` to every thread of the calling
/// process (and what it starts later). Returns how many system calls it
/// refuses outright (besides those refused for some arguments only,
/// `clone3` and x32's). Sets `no_new_privs` first (the kernel requires it
/// of a process without `CAP_SYS_ADMIN`).
pub fn refuse(profile: Profile, acts: Option<&Acts>) -> io::Result<usize> {
    apply(profile, acts, libc::EPERM)
}

fn apply(profile: Profile, acts: Option<&Acts>, errno: i32) -> io::Result<usize> {
    let prog = program(profile, acts, errno).map_err(io::Error::other)?;
    let fixed_groups = usize::from(acts.is_some_and(|a| a.groups.is_some()));
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::other("filter too long"))?,
        filter: prog.as_ptr().cast_mut().cast::<libc::sock_filter>(),
    };
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, a live array of `len`
    // instructions laid out as `struct sock_filter` (`Insn` is
    // `repr(C)` with the same fields); the kernel copies it before the
    // call returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &raw const fprog,
        )
    };
    match r {
        0 => Ok(denied(profile).len() + fixed_groups),
        // TSYNC names the thread that could not take the filter.
        tid if tid > 0 => Err(io::Error::other(format!(
            "thread {tid} has another filter; none applied"
        ))),
        _ => Err(io::Error::last_os_error()),
    }
}

/// What [`refuse`]'s outcome is said as in a helper's log.
pub fn said(r: &io::Result<usize>) -> String {
    match r {
        Ok(n) => format!("seccomp filter on ({n} system calls refused, no new namespace)"),
        Err(e) => format!("NO seccomp filter ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno the tests' filters refuse with: no refusal the tests
    /// see can come from anything but the filter.
    const MARK: i32 = libc::ENOTRECOVERABLE;

    /// The program's jumps all land inside it, and it ends on a return,
    /// with or without the ids to act as, up to the most ranges it takes;
    /// more is an error (never a program that jumps wrong).
    #[test]
    fn every_jump_lands_in_the_program() {
        let spaced = |n: u32| Acts {
            uids: (0..n).map(|i| (1000 + 2 * i, 1000 + 2 * i)).collect(),
            gids: (0..n).map(|i| (1000 + 2 * i, 1000 + 2 * i)).collect(),
            groups: None,
        };
        let near = Acts {
            uids: (0..500).map(|i| (7000 + i, 7000 + i)).collect(),
            gids: vec![(7000, 7499)],
            groups: Some(vec![4242, 7000]),
        };
        let most = spaced(u32::try_from(MAX_RANGES).unwrap() - 1);
        let programs = [
            (Profile::Nfs, None),
            (Profile::NoHandles, None),
            (Profile::NfsBroker, None),
            (Profile::Nfs, Some(&most)),
            (Profile::Nfs, Some(&near)),
        ]
        .map(|(profile, acts)| program(profile, acts, libc::EPERM).unwrap());
        assert!(program(Profile::Nfs, Some(&spaced(500)), libc::EPERM).is_err());
        for p in programs {
            assert_eq!(p.last().unwrap().code, RET_K);
            for (i, insn) in p.iter().enumerate() {
                if insn.code & 0x07 == 0x05 {
                    assert!(i + 1 + usize::from(insn.jt) < p.len(), "{i}: {insn:?}");
                    assert!(i + 1 + usize::from(insn.jf) < p.len(), "{i}: {insn:?}");
                }
            }
        }
    }

    /// What the program answers for a call (a small classic BPF machine:
    /// the instructions it uses).
    fn run(p: &[Insn], arch: u32, nr: u32, arg0: u64) -> u32 {
        run_args(p, arch, nr, [arg0, 0, 0, 0, 0, 0])
    }

    fn run_args(p: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let data = |off: u32| match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            o if o >= OFF_ARG0_LOW && (o - OFF_ARG0_LOW).is_multiple_of(8) => {
                let a = args[usize::try_from((o - OFF_ARG0_LOW) / 8).unwrap()];
                u32::try_from(a & 0xffff_ffff).unwrap()
            }
            _ => panic!("loads {off}"),
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            let taken = match i.code {
                LD_W_ABS => {
                    a = data(i.k);
                    continue;
                }
                RET_K => return i.k,
                JEQ_K => a == i.k,
                JGE_K => a >= i.k,
                JGT_K => a > i.k,
                JSET_K => a & i.k != 0,
                c => panic!("code {c:#x}"),
            };
            pc += usize::from(if taken { i.jt } else { i.jf });
        }
    }

    /// Signals, limits and priorities reach this process only; the NFS
    /// server acts only as the ids it is given, never root.
    #[test]
    fn checked_calls_follow_their_arguments() {
        let refused = RET_ERRNO | libc::EPERM as u32;
        let me = u64::from(std::process::id());
        let acts = Acts {
            uids: Acts::parse_ranges("0-10,5000-5999,65534").unwrap(),
            gids: Acts::parse_ranges("4242,65534").unwrap(),
            groups: None,
        };
        assert_eq!(Acts::ranges_text(&acts.uids), "0-10,5000-5999,65534");
        assert!(Acts::parse_ranges("9-3").is_err() && Acts::parse_ranges("x").is_err());
        for profile in [Profile::Nfs, Profile::NfsBroker, Profile::NoHandles] {
            let p = program(profile, Some(&acts), libc::EPERM).unwrap();
            // kill(0, ..): its own process group, the broker's only.
            let group = run(&p, AUDIT_ARCH, nr(libc::SYS_kill), 0);
            match profile {
                Profile::NfsBroker => assert_eq!(group, RET_ALLOW),
                Profile::Nfs | Profile::NoHandles => assert_eq!(group, refused),
            }
            assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_tgkill), 0), refused);
            for n in [libc::SYS_setsid, libc::SYS_setpgid] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), refused, "{n}");
            }
            for n in [libc::SYS_kill, libc::SYS_tgkill, libc::SYS_rt_sigqueueinfo] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), me), RET_ALLOW, "{n} to itself");
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 1), refused, "{n} to init");
                assert_eq!(
                    run(&p, AUDIT_ARCH, nr(n), me + 1),
                    refused,
                    "{n} to another"
                );
            }
            for n in [libc::SYS_prlimit64, libc::SYS_sched_setaffinity] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), RET_ALLOW);
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), me), RET_ALLOW);
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), me + 1), refused);
            }
            // PRIO_USER with who 0 would be every process of its user.
            let prio = nr(libc::SYS_setpriority);
            assert_eq!(run_args(&p, AUDIT_ARCH, prio, [2, 0, 5, 0, 0, 0]), refused);
            let fcntl = nr(libc::SYS_fcntl);
            for (cmd, want) in [
                (libc::F_GETFL, RET_ALLOW),
                (libc::F_SETFL, RET_ALLOW),
                (libc::F_DUPFD_CLOEXEC, RET_ALLOW),
                (libc::F_SETOWN, refused),
                (15, refused),
                (10, refused),
            ] {
                let args = [3, u64::from(cmd.cast_unsigned()), 0, 0, 0, 0];
                assert_eq!(run_args(&p, AUDIT_ARCH, fcntl, args), want, "fcntl {cmd}");
            }
            let ioctl = nr(libc::SYS_ioctl);
            assert_eq!(
                run_args(&p, AUDIT_ARCH, ioctl, [3, 0x5421, 0, 0, 0, 0]),
                RET_ALLOW
            );
            assert_eq!(
                run_args(&p, AUDIT_ARCH, ioctl, [3, 0x8901, 0, 0, 0, 0]),
                refused
            );
            assert_eq!(
                run_args(&p, AUDIT_ARCH, ioctl, [3, 0x8902, 0, 0, 0, 0]),
                refused
            );
            let parent = u64::from(libc::CLONE_PARENT.cast_unsigned());
            assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_clone), parent), refused);
            for tkill in [libc::SYS_tkill, libc::SYS_pidfd_send_signal] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(tkill), me), refused);
            }
        }
        let p = program(Profile::Nfs, Some(&acts), libc::EPERM).unwrap();
        let fsuid = nr(libc::SYS_setfsuid);
        for (id, want) in [
            (0, refused),
            (1, RET_ALLOW),
            (10, RET_ALLOW),
            (11, refused),
            (4999, refused),
            (5000, RET_ALLOW),
            (5999, RET_ALLOW),
            (6000, refused),
            (65534, RET_ALLOW),
            (u64::from(u32::MAX), RET_ALLOW),
            (1 << 32, refused),
        ] {
            assert_eq!(run(&p, AUDIT_ARCH, fsuid, id), want, "setfsuid({id})");
        }
        // Groups: changed at will unless fixed for its life (a server per
        // VM, acting as one user), then never, not even cleared.
        let setgroups = nr(libc::SYS_setgroups);
        assert_eq!(run(&p, AUDIT_ARCH, setgroups, 2), RET_ALLOW);
        let fixed = Acts {
            groups: Some(vec![4242, 5001]),
            ..acts.clone()
        };
        let q = program(Profile::Nfs, Some(&fixed), libc::EPERM).unwrap();
        for n in [0, 1, 2, 65536] {
            assert_eq!(run(&q, AUDIT_ARCH, setgroups, n), refused, "setgroups({n})");
        }
        assert_eq!(run(&q, AUDIT_ARCH, nr(libc::SYS_setfsgid), 4242), RET_ALLOW);
        assert_eq!(Acts::parse_ids("4242,5001").unwrap(), [4242, 5001]);
        assert!(Acts::parse_ids("").unwrap().is_empty() && Acts::parse_ids("4-5").is_err());
        let fsgid = nr(libc::SYS_setfsgid);
        assert_eq!(run(&p, AUDIT_ARCH, fsgid, 4242), RET_ALLOW);
        assert_eq!(run(&p, AUDIT_ARCH, fsgid, 4243), refused);
        assert_eq!(run(&p, AUDIT_ARCH, fsgid, 0), refused);
        // MKNOD: a FIFO or a socket's name, never a device, nor a mode
        // whose bits above the kernel's 16 would hide one.
        let mknodat = nr(libc::SYS_mknodat);
        let with_mode = |mode: u64| [3, 0x1000, mode, 0, 0, 0];
        let (fifo, sock) = (u64::from(libc::S_IFIFO), u64::from(libc::S_IFSOCK));
        for (mode, want) in [
            (fifo | 0o644, RET_ALLOW),
            (fifo | 0o7777, RET_ALLOW),
            (sock | 0o755, RET_ALLOW),
            (sock, RET_ALLOW),
            (u64::from(libc::S_IFCHR) | 0o666, refused),
            (u64::from(libc::S_IFBLK) | 0o600, refused),
            (u64::from(libc::S_IFREG) | 0o600, refused),
            (0o600, refused),
            ((1 << 16) | u64::from(libc::S_IFCHR), refused),
            ((1 << 16) | fifo, refused),
        ] {
            assert_eq!(
                run_args(&p, AUDIT_ARCH, mknodat, with_mode(mode)),
                want,
                "mknodat mode {mode:#o}"
            );
        }
        let p = program(Profile::NoHandles, None, libc::EPERM).unwrap();
        assert_eq!(
            run_args(&p, AUDIT_ARCH, mknodat, with_mode(fifo | 0o644)),
            refused,
            "LDAP and DHCP make no FIFO"
        );
    }

    fn nr(n: libc::c_long) -> u32 {
        u32::try_from(n).unwrap()
    }

    /// Calls no server makes, refused whatever the list says (the list
    /// is not its own oracle).
    const MUST_REFUSE: &[libc::c_long] = &[
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_bpf,
        libc::SYS_io_uring_setup,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_setresuid,
        libc::SYS_setuid,
        libc::SYS_setxattr,
        libc::SYS_fchmodat2,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_init_module,
    ];

    /// Every listed call is refused, and a fixed list of calls; clone
    /// only with a namespace flag, setfsuid and setfsgid (NFS) only to
    /// root; clone3 and x32's calls answer ENOSYS, another architecture
    /// is killed, and what servers do is allowed.
    #[test]
    fn the_program_answers_as_the_list_says() {
        let refused = RET_ERRNO | libc::EPERM as u32;
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        for profile in [Profile::Nfs, Profile::NfsBroker, Profile::NoHandles] {
            let p = program(profile, None, libc::EPERM).unwrap();
            for (name, n) in denied(profile) {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), refused, "{name}");
            }
            for n in MUST_REFUSE {
                assert_eq!(run(&p, AUDIT_ARCH, nr(*n), 0), refused, "{n}");
            }
            for n in [
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_openat,
                libc::SYS_futex,
                libc::SYS_mmap,
                libc::SYS_accept4,
                libc::SYS_sendmsg,
                libc::SYS_recvfrom,
                libc::SYS_exit_group,
                libc::SYS_capset,
                libc::SYS_setgroups,
            ] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), RET_ALLOW, "{n}");
            }
            // By handle: the broker only. Changes as a share's user: the
            // NFS server only.
            for n in [libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at] {
                let want = match profile {
                    Profile::NfsBroker => RET_ALLOW,
                    Profile::Nfs | Profile::NoHandles => refused,
                };
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), want, "{n}");
            }
            for n in [libc::SYS_fchownat, libc::SYS_fchmodat, libc::SYS_utimensat] {
                let want = match profile {
                    Profile::Nfs => RET_ALLOW,
                    Profile::NfsBroker | Profile::NoHandles => refused,
                };
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), want, "{n}");
            }
            assert_eq!(
                run(&p, AUDIT_ARCH, nr(libc::SYS_renameat2), 0),
                RET_ALLOW,
                "renameat2"
            );
            for (n, call) in [
                (libc::SYS_setfsuid, "setfsuid"),
                (libc::SYS_setfsgid, "setfsgid"),
            ] {
                let (to_root, to_user) = (
                    run(&p, AUDIT_ARCH, nr(n), 0),
                    run(&p, AUDIT_ARCH, nr(n), 5001),
                );
                assert_eq!(to_root, refused, "{call}(0)");
                // uid_t is 32 bits: a high half does not hide root.
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 1 << 32), refused, "{call}");
                match profile {
                    Profile::Nfs => assert_eq!(to_user, RET_ALLOW, "{call}(5001)"),
                    Profile::NfsBroker | Profile::NoHandles => {
                        assert_eq!(to_user, refused, "{call}(5001)");
                    }
                }
            }
            let clone = nr(libc::SYS_clone);
            // glibc's threads: CLONE_VM | CLONE_FS | ... | CLONE_SETTLS...
            let thread = u64::from(
                (libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM
                    | libc::CLONE_SETTLS
                    | libc::CLONE_PARENT_SETTID
                    | libc::CLONE_CHILD_CLEARTID)
                    .cast_unsigned(),
            );
            assert_eq!(run(&p, AUDIT_ARCH, clone, thread), RET_ALLOW);
            // A clone whose flags equal a listed call's number is still
            // a clone (the flags are not taken for a call's number).
            let unshare = u64::from(nr(libc::SYS_unshare));
            assert_eq!(run(&p, AUDIT_ARCH, clone, unshare), RET_ALLOW);
            for f in [
                libc::CLONE_NEWUSER,
                libc::CLONE_NEWNS,
                libc::CLONE_NEWNET,
                libc::CLONE_NEWPID,
            ] {
                assert_eq!(
                    run(&p, AUDIT_ARCH, clone, thread | u64::from(f.cast_unsigned())),
                    refused,
                    "{f:#x}"
                );
            }
            assert_eq!(run(&p, AUDIT_ARCH, nr(libc::SYS_clone3), 0), enosys);
            #[cfg(target_arch = "x86_64")]
            {
                assert_eq!(run(&p, AUDIT_ARCH, X32_SYSCALL_BIT | 1, 0), enosys);
                assert_eq!(
                    run(&p, AUDIT_ARCH, X32_SYSCALL_BIT | 520, 0),
                    enosys,
                    "x32 execve"
                );
                // i386 (AUDIT_ARCH_I386).
                assert_eq!(run(&p, 3 | 0x4000_0000, 20, 0), RET_KILL_PROCESS);
            }
        }
    }

    /// Runs `name` again in a child with `COFFRE_SECCOMP_CHILD` set: a
    /// filter cannot be taken off.
    fn in_child(name: &str, profile: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("COFFRE_SECCOMP_CHILD", profile)
            .output()
            .unwrap()
    }

    /// The errno of a raw call that failed, or `None`.
    fn errno(r: libc::c_long) -> Option<i32> {
        (r < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Under the filter: no namespace, mount, io_uring, bpf, exec, ptrace
    /// or new socket, not through clone, clone3 or x32's numbers either;
    /// no way back to root's credentials; threads, files and the sockets
    /// it had work as before; only the NFS broker opens by handle, only
    /// the NFS server acts as a share's user.
    #[test]
    fn a_filtered_process_keeps_its_work_and_loses_the_way_out() {
        let Some(profile) = std::env::var_os("COFFRE_SECCOMP_CHILD") else {
            for p in ["nfs", "broker", "nohandles"] {
                let out = in_child(
                    "seccomp::tests::a_filtered_process_keeps_its_work_and_loses_the_way_out",
                    p,
                );
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(out.status.success(), "{p}: {said}");
                assert!(said.contains("filtered child ran"), "{p}: {said}");
            }
            return;
        };
        let profile = match profile.to_str() {
            Some("nfs") => Profile::Nfs,
            Some("broker") => Profile::NfsBroker,
            _ => Profile::NoHandles,
        };
        let tmp = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let acts = Acts {
            uids: vec![(5001, 5002)],
            gids: vec![(5001, 5002)],
            groups: None,
        };
        let n = apply(profile, Some(&acts), MARK).unwrap();
        assert!(n > 60, "{n}");
        let marked = Some(MARK);
        // SAFETY (the calls below): raw system calls with integer
        // arguments or null pointers; a clone that wrongly succeeded
        // exits at once in the child.
        unsafe {
            assert_eq!(
                errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
                marked
            );
            assert_eq!(
                errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)),
                marked
            );
            let r = libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            );
            if r == 0 {
                libc::_exit(0);
            }
            assert_eq!(errno(r), marked, "clone with CLONE_NEWUSER");
            assert_eq!(
                errno(libc::syscall(libc::SYS_clone3, 0, 0)),
                Some(libc::ENOSYS)
            );
            assert_eq!(
                errno(libc::syscall(
                    libc::SYS_io_uring_setup,
                    8,
                    std::ptr::null_mut::<u8>()
                )),
                marked
            );
            assert_eq!(errno(libc::syscall(libc::SYS_bpf, 0, 0, 0)), marked);
            assert_eq!(errno(libc::syscall(libc::SYS_ptrace, 0, 1, 0, 0)), marked);
            assert_eq!(errno(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0)), marked);
            assert_eq!(
                errno(libc::syscall(libc::SYS_setresuid, -1, -1, -1)),
                marked
            );
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                errno(libc::syscall(
                    libc::SYS_unshare | libc::c_long::from(X32_SYSCALL_BIT.cast_signed()),
                    libc::CLONE_NEWUSER
                )),
                Some(libc::ENOSYS),
                "x32's unshare"
            );
            // setfsuid answers the previous fsuid, or -1 when filtered.
            assert_eq!(errno(libc::syscall(libc::SYS_setfsuid, 0)), marked);
            let by_handle = errno(libc::syscall(
                libc::SYS_open_by_handle_at,
                -1,
                std::ptr::null_mut::<u8>(),
                0,
            ));
            match profile {
                // EFAULT or EBADF: the kernel's answer, not the filter's.
                Profile::NfsBroker => assert!(by_handle.is_some() && by_handle != marked),
                Profile::Nfs | Profile::NoHandles => assert_eq!(by_handle, marked),
            }
        }
        // MKNOD: a FIFO for the NFS server, never a device (as root here,
        // the filter alone refuses it); nothing for the others.
        let at = |name: &str| {
            std::ffi::CString::new(tmp.path().join(name).into_os_string().into_encoded_bytes())
                .unwrap()
        };
        let (fifo, dev) = (at("fifo"), at("null"));
        // SAFETY: NUL-terminated paths that outlive the calls.
        let (made_fifo, made_dev) = unsafe {
            (
                errno(libc::syscall(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD,
                    fifo.as_ptr(),
                    libc::S_IFIFO | 0o600,
                    0,
                )),
                errno(libc::syscall(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD,
                    dev.as_ptr(),
                    libc::S_IFCHR | 0o600,
                    libc::makedev(1, 3),
                )),
            )
        };
        assert_eq!(made_dev, marked, "a device made");
        match profile {
            Profile::Nfs => assert_eq!(made_fifo, None, "a FIFO refused"),
            Profile::NfsBroker | Profile::NoHandles => assert_eq!(made_fifo, marked),
        }
        // Signals to itself only.
        // SAFETY: kill with signal 0 (a check, nothing sent).
        unsafe {
            assert_eq!(errno(libc::syscall(libc::SYS_kill, 1, 0)), marked);
            assert_eq!(
                libc::syscall(
                    libc::SYS_kill,
                    libc::c_long::from(std::process::id().cast_signed()),
                    0
                ),
                0
            );
        }
        // No new socket: not to a UNIX socket by its path, not TCP.
        let e = std::os::unix::net::UnixStream::connect("/run/no-such.sock").unwrap_err();
        assert_eq!(e.raw_os_error(), marked, "{e}");
        let e = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap_err();
        assert_eq!(e.raw_os_error(), marked, "{e}");
        listener.set_nonblocking(true).unwrap();
        let e = listener.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        let e = std::process::Command::new("/bin/true")
            .status()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), marked, "{e}");
        // What a server does.
        let t = std::thread::spawn(|| 6 * 7);
        assert_eq!(t.join().unwrap(), 42);
        std::fs::write(tmp.path().join("f"), "x").unwrap();
        std::fs::rename(tmp.path().join("f"), tmp.path().join("g")).unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("g")).unwrap(), "x");
        // Modes: through fchmodat (as the NFS server does), never the
        // old chmod, nor fchmodat2 (which reaches O_PATH descriptors).
        let g = std::ffi::CString::new(tmp.path().join("g").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: `g` is a NUL-terminated path that outlives the calls.
        let (at, old, at2) = unsafe {
            (
                errno(libc::syscall(
                    libc::SYS_fchmodat,
                    libc::AT_FDCWD,
                    g.as_ptr(),
                    0o600,
                )),
                errno(libc::syscall(libc::SYS_chmod, g.as_ptr(), 0o600)),
                errno(libc::syscall(
                    libc::SYS_fchmodat2,
                    libc::AT_FDCWD,
                    g.as_ptr(),
                    0o600,
                    0,
                )),
            )
        };
        assert_eq!((old, at2), (marked, marked));
        match profile {
            Profile::Nfs => assert_eq!(at, None),
            Profile::NfsBroker | Profile::NoHandles => assert_eq!(at, marked),
        }
        // Last (there is no way back to root): a share's user, then
        // another, never root again.
        // SAFETY: setfsuid with plain integers.
        unsafe {
            let as_user = libc::syscall(libc::SYS_setfsuid, 5001);
            match profile {
                Profile::Nfs => {
                    // Not refused (what it answers depends on this
                    // process's capabilities: a test run as root or not).
                    assert_ne!(errno(as_user), marked);
                    assert_eq!(errno(libc::syscall(libc::SYS_setfsuid, 0)), marked);
                    assert_eq!(errno(libc::syscall(libc::SYS_setfsuid, 4000)), marked);
                    assert_ne!(errno(libc::syscall(libc::SYS_setfsuid, 5002)), marked);
                }
                Profile::NfsBroker | Profile::NoHandles => assert_eq!(errno(as_user), marked),
            }
        }
        println!("filtered child ran");
    }

    /// i386's `int 0x80` gate from this process, in a child: whether it
    /// survives (without the filter, a getpid).
    #[cfg(target_arch = "x86_64")]
    fn int80(filtered: bool) -> std::process::ExitStatus {
        let out = in_child(
            "seccomp::tests::another_architectures_call_kills_the_process",
            if filtered { "filtered" } else { "unfiltered" },
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("about to call"), "{said}");
        out.status
    }

    /// A system call through i386's gate (`int 0x80`) kills the process:
    /// its numbers are another table's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn another_architectures_call_kills_the_process() {
        let Some(how) = std::env::var_os("COFFRE_SECCOMP_CHILD") else {
            use std::os::unix::process::ExitStatusExt;
            // A kernel without ia32 emulation answers SIGSEGV before any
            // filter is asked: the test then proves nothing, and says so.
            let plain = int80(false);
            let filtered = int80(true);
            if plain.success() {
                assert_eq!(filtered.signal(), Some(libc::SIGSYS), "{filtered:?}");
            } else {
                assert_eq!(plain.signal(), Some(libc::SIGSEGV), "{plain:?}");
                eprintln!("no ia32 emulation here: int 0x80 faults with or without the filter");
            }
            return;
        };
        if how == "filtered" {
            refuse(Profile::NoHandles, None).unwrap();
        }
        println!("about to call");
        let r: i64;
        // SAFETY: i386's getpid (20) through int 0x80: no memory is
        // touched; the filter kills the process before it runs.
        unsafe {
            std::arch::asm!("int 0x80", inlateout("eax") 20i64 => r, options(nostack));
        }
        assert!(r > 0, "{r}");
    }
}
