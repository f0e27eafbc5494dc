//! The exposure stack on a real LUKS2 volume, with the real kernel parts
//! (FUSE, loop, ext4). Needs root, /dev/fuse and loop devices.

use coffre_testkit::volume as support;
use coffre_testkit::{Need, require};

use coffre_data::{ClosePolicy, Layout, Ownership, expose, format_ext4, system};
use std::io::Write;
use std::time::Duration;

/// Closes `e`, which `child` (a `sleep`) holds: it is named, signalled,
/// and the close goes on.
fn closing_stops(e: &mut coffre_data::Exposure, child: &std::process::Child) {
    let report = e
        .close(&ClosePolicy {
            grace: Duration::from_millis(300),
            force: false,
        })
        .unwrap();
    assert!(
        report
            .killed
            .iter()
            .any(|h| h.pid == child.id().cast_signed() && h.comm == "sleep"),
        "{report:?}"
    );
}

#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn format_mount_write_close_reopen() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let t = tempfile::tempdir().unwrap();
    let (c, key) = support::scratch_volume(t.path(), 64 << 20);
    let l = Layout::under(t.path());
    format_ext4(c.open_volume(&key).unwrap(), &l.volume_file).unwrap();
    let own = Ownership {
        team_gid: 4242,
        members: vec![("alice".into(), 5001, 5001)],
        current: vec!["alice".into()],
    };
    let mut e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    let home = l.mountpoint.join("home/alice");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&home).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5001, 5001, 0o700));
        let m = std::fs::metadata(l.mountpoint.join("shared")).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o7777), (4242, 0o2770));
    }
    let secret = b"the partner's drawings, revision C\n".repeat(1000);
    std::fs::write(home.join("notes.txt"), &secret).unwrap();
    let st = e.status();
    assert!(st.loop_device.is_some());
    let report = e
        .close(&ClosePolicy {
            grace: Duration::from_secs(1),
            force: false,
        })
        .unwrap();
    assert!(report.killed.is_empty());
    assert!(system::mount_at(&l.mountpoint).is_none());
    assert!(system::mount_at(&l.volume_file).is_none());
    assert!(system::LoopDevice::backed_by(&l.volume_file).is_empty());
    assert!(!l.nbd_socket.exists());
    let raw = std::fs::read(t.path().join("volume.img")).unwrap();
    assert!(
        !raw.windows(24).any(|w| w == &secret[..24]),
        "plaintext on the backing storage"
    );
    let mut e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    assert_eq!(std::fs::read(home.join("notes.txt")).unwrap(), secret);
    // A process holding a file: named, signalled, and the close goes on.
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .current_dir(&home)
        .spawn()
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(home.join("notes.txt"))
        .unwrap();
    f.write_all(b"acknowledged line\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    closing_stops(&mut e, &child);
    assert!(!child.wait().unwrap().success());
    let e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    assert!(
        std::fs::read(home.join("notes.txt"))
            .unwrap()
            .ends_with(b"acknowledged line\n")
    );
    drop(e);
    assert!(system::mount_at(&l.mountpoint).is_none());
}

/// The shares' mounts for the NFS server: each share's directory mounted
/// again, `nosuid,nodev,noexec`, after the data and taken down before it
/// (a process holding a file there is stopped as on the data); a share
/// that is missing, or reached through a symbolic link, is not mounted
/// (and said), without failing the open; what a dead daemon left goes
/// with the rest.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn the_shares_mounts_come_and_go_with_the_data() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let t = tempfile::tempdir().unwrap();
    // Under a shared mount, as a systemd host's `/` is: the server's
    // mounts must not propagate from it.
    let sh = |args: &[&str]| {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(st.success(), "{args:?}");
    };
    let top = t.path().to_str().unwrap().to_string();
    sh(&["mount", "--bind", &top, &top]);
    sh(&["mount", "--make-shared", &top]);
    let shared_tag = |at: &std::path::Path| {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let at = at.to_str().unwrap().to_string();
        mi.lines()
            .filter(|l| l.split(' ').nth(4) == Some(at.as_str()))
            .any(|l| l.split(" - ").next().unwrap_or("").contains(" shared:"))
    };
    let (c, key) = support::scratch_volume(t.path(), 64 << 20);
    let nfs = t.path().join("run/nfs");
    // Each VM's own mount point in a directory of its own (`vmN/share`);
    // two VMs that share a directory get a mount each.
    let view = |share: &str, n: u32| coffre_data::ShareView {
        share: share.into(),
        at: nfs.join(format!("vm{n}/share")),
    };
    let l = Layout {
        nfs_shares: vec![
            view("shared", 0),
            view("missing", 1),
            view("shared/etc", 2),
            view("shared", 3),
        ],
        ..Layout::under(t.path())
    };
    format_ext4(c.open_volume(&key).unwrap(), &l.volume_file).unwrap();
    let own = Ownership::default();
    // The server's directory: its mount points, read-only (even to root).
    assert!(
        coffre_data::nfs_dir(&nfs, &l.nfs_shares)
            .unwrap()
            .is_empty()
    );
    let ro = system::mount_at(&nfs).expect("the server's directory is mounted");
    assert!(ro.has_option("ro") && ro.fstype == "tmpfs", "{ro:?}");
    // Again (a server started again): kept as it is.
    assert!(
        coffre_data::nfs_dir(&nfs, &l.nfs_shares)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        system::mounts()
            .iter()
            .filter(|m| m.mountpoint == nfs)
            .count(),
        1
    );
    let e = std::os::unix::fs::symlink("/etc", nfs.join("x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    // A member puts a link where a share is expected.
    std::os::unix::fs::symlink("/etc", l.mountpoint.join("shared/etc")).unwrap();
    drop(e);
    let mut e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    let data = system::mount_at(&l.mountpoint).unwrap();
    let m = system::mount_at(&nfs.join("vm0/share")).expect("the share is mounted");
    assert!(shared_tag(&l.mountpoint), "the test's parent is not shared");
    assert!(!shared_tag(&nfs), "the server's directory propagates");
    assert!(
        !shared_tag(&nfs.join("vm0/share")),
        "the share's mount propagates"
    );
    assert_eq!(
        m.dev, data.dev,
        "the share's mount is the data's filesystem"
    );
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(m.has_option(o), "{o}: {m:?}");
    }
    let failed: Vec<String> = e
        .share_failures()
        .iter()
        .map(|(s, _)| s.display().to_string())
        .collect();
    assert_eq!(
        failed,
        ["missing", "shared/etc"],
        "{:?}",
        e.share_failures()
    );
    let why = |n: usize| e.share_failures()[n].1.clone();
    assert!(why(0).contains("No such file"), "{}", why(0));
    assert!(why(1).contains("symbolic links"), "{}", why(1));
    for n in [1, 2] {
        assert!(system::mount_at(&nfs.join(format!("vm{n}/share"))).is_none());
    }
    assert!(
        std::fs::read_dir(nfs.join("vm2/share"))
            .unwrap()
            .next()
            .is_none(),
        "the link was followed"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&nfs).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
    }
    std::fs::write(l.mountpoint.join("shared/a"), "through the data").unwrap();
    for vm in ["vm0", "vm3"] {
        assert_eq!(
            std::fs::read_to_string(nfs.join(vm).join("share/a")).unwrap(),
            "through the data",
            "{vm}"
        );
    }
    // The rest of the data is not in the share's mount.
    assert!(!nfs.join("vm0/share/disks").exists());
    // A process holding the share's mount does not keep the data open.
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .current_dir(nfs.join("vm0/share"))
        .spawn()
        .unwrap();
    closing_stops(&mut e, &child);
    assert!(!child.wait().unwrap().success());
    assert!(system::mount_at(&nfs.join("vm0/share")).is_none());
    assert!(system::mount_at(&nfs.join("vm3/share")).is_none());
    assert!(system::mount_at(&l.mountpoint).is_none());
    assert!(system::LoopDevice::backed_by(&l.volume_file).is_empty());
    // The server's directory keeps the mount points it is given and
    // loses what an older configuration left.
    assert!(coffre_data::release_nfs_dir(&nfs).is_empty());
    assert!(system::mount_at(&nfs).is_none());
    // Without it, no share is mounted (not on the host's own directory),
    // even where the mount points are there on the host.
    std::fs::create_dir_all(nfs.join("vm0/share")).unwrap();
    let e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    assert_eq!(e.share_failures().len(), 4, "{:?}", e.share_failures());
    let why = &e.share_failures()[0].1;
    assert!(
        why.contains("is not the NFS server's own directory (a read-only tmpfs)")
            && !why.contains("No such file"),
        "{:?}",
        e.share_failures()
    );
    assert!(system::mount_at(&nfs.join("vm0/share")).is_none());
    drop(e);
    assert!(
        coffre_data::nfs_dir(&nfs, &l.nfs_shares[..1])
            .unwrap()
            .is_empty()
    );
    let left: Vec<_> = std::fs::read_dir(&nfs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["vm0"]);
    let inside: Vec<_> = std::fs::read_dir(nfs.join("vm0"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(inside, ["share"]);

    // Left behind (as by a daemon killed while open): the cleanup takes
    // the server's directory down first (the share's mount in it holds
    // the data), then the rest.
    let l = Layout {
        nfs_shares: l.nfs_shares[..1].to_vec(),
        ..l
    };
    let e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    assert!(e.share_failures().is_empty(), "{:?}", e.share_failures());
    let share0 = nfs.join("vm0/share");
    assert!(system::mount_at(&share0).is_some());
    let done = coffre_data::cleanup_stale(&Layout::under(t.path()), Duration::from_secs(1));
    assert!(
        done.iter().any(|d| d
            == &format!(
                "unmounted 2 mount(s) in {} left by a previous daemon",
                nfs.display()
            )),
        "{done:?}"
    );
    assert!(system::mount_at(&share0).is_none(), "{done:?}");
    assert!(system::mount_at(&nfs).is_none(), "{done:?}");
    assert!(system::mount_at(&l.mountpoint).is_none(), "{done:?}");
    assert!(system::LoopDevice::backed_by(&l.volume_file).is_empty());
    drop(e);
    sh(&["umount", "-l", &top]);
}
