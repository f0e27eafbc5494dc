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
//!   clocks, host and domain names, `personality`, `mknod`, x86's
//!   `iopl`/`ioperm`/`modify_ldt`, and obsolete calls (`uselib`,
//!   `nfsservctl`, `lookup_dcookie`);
//! - for the servers that do not open files by handle (LDAP, DHCP):
//!   `open_by_handle_at` and `name_to_handle_at`.
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
    /// The NFS server: opens the team's files by handle.
    Nfs,
    /// A helper with no file to open by handle (LDAP, DHCP).
    NoHandles,
}

// struct seccomp_data: nr (u32) at 0, arch (u32) at 4, instruction
// pointer (u64) at 8, args (6 × u64) from 16. Little-endian: an
// argument's low half is at its own offset.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LOW: u32 = 16;

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
        SYS_mknodat,
        SYS_vhangup,
        SYS_lookup_dcookie,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend(calls![
        SYS_mknod,
        SYS_iopl,
        SYS_ioperm,
        SYS_modify_ldt,
        SYS_uselib,
        SYS_nfsservctl,
    ]);
    if profile == Profile::NoHandles {
        v.extend(calls![SYS_open_by_handle_at, SYS_name_to_handle_at]);
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

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter's program for `profile`.
fn program(profile: Profile) -> Result<Vec<Insn>, String> {
    let deny: Vec<u32> = denied(profile)
        .iter()
        .map(|(n, nr)| u32::try_from(*nr).map_err(|_| format!("{n}: {nr}")))
        .collect::<Result<_, _>>()?;
    let clone = u32::try_from(libc::SYS_clone).map_err(|e| e.to_string())?;
    let clone3 = u32::try_from(libc::SYS_clone3).map_err(|e| e.to_string())?;
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
    ]);
    // Each listed call jumps to the EPERM at the very end, over the six
    // instructions of clone3's and clone's checks.
    let n = deny.len();
    for (i, nr) in deny.iter().enumerate() {
        let to_deny =
            u8::try_from(n - i + 5).map_err(|_| "too many calls to refuse".to_string())?;
        p.push(jump(JEQ_K, *nr, to_deny, 0));
    }
    p.extend([
        jump(JEQ_K, clone3, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
        // Not clone: on to ALLOW.
        jump(JEQ_K, clone, 0, 2),
        stmt(LD_W_ABS, OFF_ARG0_LOW),
        jump(JSET_K, CLONE_NEW_ANY, 1, 0),
        stmt(RET_K, RET_ALLOW),
        stmt(RET_K, RET_ERRNO | libc::EPERM as u32),
    ]);
    Ok(p)
}

/// Applies the filter for `profile` to every thread of the calling
/// process (and what it starts later). Returns how many system calls it
/// refuses outright (besides `clone` with a namespace flag, `clone3` and
/// x32's). Sets `no_new_privs` first (the kernel requires it of a
/// process without `CAP_SYS_ADMIN`).
pub fn refuse(profile: Profile) -> io::Result<usize> {
    let prog = program(profile).map_err(io::Error::other)?;
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
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(denied(profile).len())
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

    /// The program's jumps all land inside it, and it ends on a return.
    #[test]
    fn every_jump_lands_in_the_program() {
        for profile in [Profile::Nfs, Profile::NoHandles] {
            let p = program(profile).unwrap();
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
        let data = |off: u32| match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            OFF_ARG0_LOW => u32::try_from(arg0 & 0xffff_ffff).unwrap(),
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
                JSET_K => a & i.k != 0,
                c => panic!("code {c:#x}"),
            };
            pc += usize::from(if taken { i.jt } else { i.jf });
        }
    }

    /// Every listed call is refused, clone only with a namespace flag,
    /// clone3 and x32's calls answer ENOSYS, another architecture is
    /// killed, and what servers do is allowed.
    #[test]
    fn the_program_answers_as_the_list_says() {
        let nr = |n: libc::c_long| u32::try_from(n).unwrap();
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        for profile in [Profile::Nfs, Profile::NoHandles] {
            let p = program(profile).unwrap();
            let listed = denied(profile);
            for (name, n) in &listed {
                assert_eq!(run(&p, AUDIT_ARCH, nr(*n), 0), eperm, "{name}");
            }
            for n in [
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_openat,
                libc::SYS_futex,
                libc::SYS_mmap,
                libc::SYS_accept4,
                libc::SYS_sendmsg,
                libc::SYS_renameat2,
                libc::SYS_setfsuid,
                libc::SYS_exit_group,
            ] {
                assert_eq!(run(&p, AUDIT_ARCH, nr(n), 0), RET_ALLOW, "{n}");
            }
            let by_handle = run(&p, AUDIT_ARCH, nr(libc::SYS_open_by_handle_at), 0);
            match profile {
                Profile::Nfs => assert_eq!(by_handle, RET_ALLOW),
                Profile::NoHandles => assert_eq!(by_handle, eperm),
            }
            let clone = nr(libc::SYS_clone);
            // glibc's threads: CLONE_VM | CLONE_FS | ... | CLONE_SETTLS...
            let thread = (libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS
                | libc::CLONE_PARENT_SETTID
                | libc::CLONE_CHILD_CLEARTID) as u64;
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
                    eperm,
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

    fn errno(r: libc::c_long) -> Option<i32> {
        (r < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Under the filter: no namespace, mount, io_uring, bpf, exec or
    /// ptrace, not through clone, clone3 or x32's numbers either; threads,
    /// files and sockets work as before; only the NFS server's profile
    /// opens by handle.
    #[test]
    fn a_filtered_process_keeps_its_work_and_loses_the_way_out() {
        let Some(profile) = std::env::var_os("COFFRE_SECCOMP_CHILD") else {
            for p in ["nfs", "nohandles"] {
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
        let profile = if profile == "nfs" {
            Profile::Nfs
        } else {
            Profile::NoHandles
        };
        let tmp = tempfile::tempdir().unwrap();
        let n = refuse(profile).unwrap();
        assert!(n > 40, "{n}");
        // SAFETY (the calls below): raw system calls with integer
        // arguments or null pointers; a clone that wrongly succeeded
        // exits at once in the child.
        let eperm = Some(libc::EPERM);
        unsafe {
            assert_eq!(
                errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
                eperm
            );
            assert_eq!(
                errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS)),
                eperm
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
            assert_eq!(errno(r), eperm, "clone with CLONE_NEWUSER");
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
                eperm
            );
            assert_eq!(errno(libc::syscall(libc::SYS_bpf, 0, 0, 0)), eperm);
            assert_eq!(errno(libc::syscall(libc::SYS_ptrace, 0, 1, 0, 0)), eperm);
            assert_eq!(errno(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0)), eperm);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                errno(libc::syscall(
                    libc::SYS_unshare | libc::c_long::from(X32_SYSCALL_BIT.cast_signed()),
                    libc::CLONE_NEWUSER
                )),
                Some(libc::ENOSYS),
                "x32's unshare"
            );
            // By handle: a bad descriptor (EBADF) where allowed.
            let by_handle = errno(libc::syscall(
                libc::SYS_open_by_handle_at,
                -1,
                std::ptr::null_mut::<u8>(),
                0,
            ));
            match profile {
                Profile::Nfs => assert_ne!(by_handle, eperm),
                Profile::NoHandles => assert_eq!(by_handle, eperm),
            }
        }
        assert!(std::process::Command::new("/bin/true").status().is_err());
        // What a server does.
        let t = std::thread::spawn(|| 6 * 7);
        assert_eq!(t.join().unwrap(), 42);
        std::fs::write(tmp.path().join("f"), "x").unwrap();
        std::fs::rename(tmp.path().join("f"), tmp.path().join("g")).unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("g")).unwrap(), "x");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        drop((l, c));
        println!("filtered child ran");
    }

    /// A system call through i386's gate (`int 0x80`) kills the process:
    /// its numbers are another table's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn another_architectures_call_kills_the_process() {
        if std::env::var_os("COFFRE_SECCOMP_CHILD").is_none() {
            use std::os::unix::process::ExitStatusExt;
            let out = in_child(
                "seccomp::tests::another_architectures_call_kills_the_process",
                "nohandles",
            );
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("filter on"), "{said}");
            assert!(!said.contains("survived"), "{said}");
            // SIGSYS from the filter; a kernel without ia32 emulation
            // would answer SIGSEGV before the filter is asked.
            assert!(
                matches!(out.status.signal(), Some(libc::SIGSYS | libc::SIGSEGV)),
                "{:?}",
                out.status
            );
            return;
        }
        refuse(Profile::NoHandles).unwrap();
        println!("filter on");
        let r: i64;
        // SAFETY: i386's getpid (20) through int 0x80: no memory is
        // touched; the filter kills the process before it runs.
        unsafe {
            std::arch::asm!("int 0x80", inlateout("eax") 20i64 => r, options(nostack));
        }
        println!("survived: {r}");
    }
}
