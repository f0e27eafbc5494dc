//! The exposure stack on a real LUKS2 volume, with the real kernel parts
//! (FUSE, loop, ext4). Needs root, /dev/fuse and loop devices.

use coffre_testkit::volume as support;
use coffre_testkit::{Need, require};

use coffre_data::{ClosePolicy, Layout, Ownership, expose, format_ext4, system};
use std::io::Write;
use std::time::Duration;

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

/// The NFS server's view: a second mount of the data, `nosuid,nodev,
/// noexec`, made after the data and taken down before it (a process
/// holding a file there is stopped as on the data); one a dead daemon
/// left goes with the rest.
#[test]
#[ignore = "system: needs root, FUSE, loop, mkfs.ext4"]
fn the_nfs_view_comes_and_goes_with_the_data() {
    require(&[Need::Root, Need::Fuse, Need::Loop, Need::Ext4]);
    let t = tempfile::tempdir().unwrap();
    let (c, key) = support::scratch_volume(t.path(), 64 << 20);
    let view = t.path().join("run/nfs/data");
    let l = Layout {
        nfs_view: Some(view.clone()),
        ..Layout::under(t.path())
    };
    format_ext4(c.open_volume(&key).unwrap(), &l.volume_file).unwrap();
    let own = Ownership::default();
    let mut e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    let data = system::mount_at(&l.mountpoint).unwrap();
    let m = system::mount_at(&view).expect("the view is mounted");
    assert_eq!(m.dev, data.dev, "the view is the data's filesystem");
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(m.has_option(o), "{o}: {m:?}");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join("run/nfs"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
    }
    std::fs::write(l.mountpoint.join("shared/a"), "through the data").unwrap();
    assert_eq!(
        std::fs::read_to_string(view.join("shared/a")).unwrap(),
        "through the data"
    );
    // A process holding the view does not keep the data open.
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .current_dir(view.join("shared"))
        .spawn()
        .unwrap();
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
            .any(|h| h.pid == child.id().cast_signed()),
        "{report:?}"
    );
    assert!(!child.wait().unwrap().success());
    assert!(system::mount_at(&view).is_none());
    assert!(system::mount_at(&l.mountpoint).is_none());
    assert!(system::LoopDevice::backed_by(&l.volume_file).is_empty());

    // Left behind (as by a daemon killed while open): the cleanup takes
    // the view down first, then the rest.
    let e = expose(c.open_volume(&key).unwrap(), &l, &own).unwrap();
    assert!(system::mount_at(&view).is_some());
    let done = coffre_data::cleanup_stale(&Layout::under(t.path()), Duration::from_secs(1));
    assert!(
        done.iter()
            .any(|d| d == &format!("unmounted {} left by a previous daemon", view.display())),
        "{done:?}"
    );
    assert!(system::mount_at(&view).is_none(), "{done:?}");
    assert!(system::mount_at(&l.mountpoint).is_none(), "{done:?}");
    assert!(system::LoopDevice::backed_by(&l.volume_file).is_empty());
    drop(e);
}
