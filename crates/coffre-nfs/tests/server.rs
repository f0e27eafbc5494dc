//! The server against a real NFS client (libnfs's `nfs-cp`, `nfs-cat`,
//! `nfs-ls`) and against raw RPC calls where a test needs to send exactly
//! one message (a retransmission, a forged handle, a call while closed).
//! As root, on the project's ext4 disk (file handles need a filesystem
//! that exports them), on loopback addresses: 127.0.0.1 is the export of
//! `shared` as alice, 127.0.0.2 the export of `home/alice`.

use coffre_nfs::proto::status;
use coffre_nfs::xdr::{Reader, Writer};
use coffre_nfs::{ExportSpec, HandleKey, Keeper, Listen, Server, Sockets};
use coffre_testkit::Need;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const NEEDS: &[Need] = &[Need::Root, Need::NfsClient];
const ALICE: u32 = 5301;
const BOB: u32 = 5302;
const TEAM: u32 = 5300;

struct Lab {
    dir: PathBuf,
    server: Arc<Server>,
    port: u16,
    key: [u8; 32],
    specs: Vec<ExportSpec>,
}

fn chown(p: &Path, uid: u32, gid: u32, mode: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Lab {
    fn new(name: &str) -> Self {
        Self::on(name, false)
    }

    /// With `own_ext4`, the data is an ext4 of its own (an image on a
    /// loop device, unmounted with the lab) whose periodic journal commit
    /// is pushed out of the way: what commits it is the server.
    fn on(name: &str, own_ext4: bool) -> Self {
        coffre_testkit::require(NEEDS);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        if own_ext4 {
            std::fs::create_dir_all(&data).unwrap();
            let img = dir.join("data.img");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(32 << 20)
                .unwrap();
            // No fast commits: an fsync then always commits a transaction.
            coffre_testkit::run_ok(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-O", "^fast_commit"])
                    .arg(&img),
            );
            coffre_testkit::run_ok(
                Command::new("mount")
                    .args(["-o", "loop,commit=600"])
                    .arg(&img)
                    .arg(&data),
            );
        }
        for d in ["shared", "home/alice", "home/bob", "disks"] {
            std::fs::create_dir_all(data.join(d)).unwrap();
        }
        chown(&data.join("shared"), 0, TEAM, 0o2770);
        chown(&data.join("home"), 0, TEAM, 0o2750);
        chown(&data.join("home/alice"), ALICE, ALICE, 0o700);
        chown(&data.join("home/bob"), BOB, BOB, 0o700);
        std::fs::write(data.join("home/bob/secret"), b"bob's").unwrap();
        chown(&data.join("home/bob/secret"), BOB, BOB, 0o600);
        std::fs::write(data.join("shared/root-only"), b"root's").unwrap();
        chown(&data.join("shared/root-only"), 0, 0, 0o600);
        let server = Arc::new(Server::new());
        let sockets = Sockets::bind(&Listen {
            addr: Ipv4Addr::LOCALHOST,
            nfs_port: 0,
            portmap_port: None,
            udp_mark: None,
            device: None,
        })
        .unwrap();
        let port = sockets.nfs_port();
        let s = Arc::clone(&server);
        std::thread::spawn(move || s.serve(sockets, 4));
        let spec =
            |client: Ipv4Addr, share: &str, uid: u32, gid: u32, groups: Vec<u32>| ExportSpec {
                workload: format!("vm-{client}"),
                client,
                share: share.into(),
                path: data.join(share),
                uid,
                gid,
                groups,
                readonly: false,
                denied: false,
                mounted: false,
                async_metadata: false,
            };
        let specs = vec![
            spec(
                Ipv4Addr::new(127, 0, 0, 1),
                "shared",
                ALICE,
                ALICE,
                vec![ALICE, TEAM],
            ),
            spec(
                Ipv4Addr::new(127, 0, 0, 2),
                "home/alice",
                ALICE,
                ALICE,
                vec![ALICE, TEAM],
            ),
        ];
        server.set_exports(specs.clone());
        let key = [7u8; 32];
        let lab = Self {
            dir,
            server,
            port,
            key,
            specs,
        };
        assert!(lab.open().is_empty());
        lab
    }

    /// Opens the server as its process does: its handles from a broker
    /// holding the key, over the broker's protocol (on a thread here).
    fn open(&self) -> Vec<(String, String)> {
        let (keeper, mut failed) = Keeper::open(HandleKey::new(self.key), &self.specs);
        let client = coffre_nfs::broker::on_a_thread(keeper).unwrap();
        coffre_nfs::server::merge(&mut failed, self.server.open(Arc::new(client)));
        failed
    }

    /// libnfs takes the URL's directory as the export to mount: `""`
    /// for a file at the top, where its discovery of nested exports
    /// gives up ("Export is empty", whatever the server answers); the
    /// kernel client never looks for them.
    fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1/{path}?version=3&nfsport={p}&mountport={p}&auto-traverse-mounts=0",
            p = self.port
        )
    }

    fn data(&self, rel: &str) -> PathBuf {
        self.dir.join("data").join(rel)
    }

    fn client(&self, from: Ipv4Addr) -> Client {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(from.into(), 0).into()).unwrap();
        s.connect(&SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port).into())
            .unwrap();
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        Client { s, xid: 1 }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.server.close();
        let data = self.dir.join("data");
        if self.journal().is_some() {
            let _ = Command::new("umount").arg(&data).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// The journal's statistics of the data's own ext4, if it has one
    /// (`/proc/fs/jbd2/DEV-8/info`).
    fn journal(&self) -> Option<PathBuf> {
        let data = self.dir.join("data");
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let dev = info
            .lines()
            .find(|l| l.split(' ').nth(4) == data.to_str())?
            .split(" - ")
            .nth(1)?
            .split(' ')
            .nth(1)?
            .trim_start_matches("/dev/")
            .to_owned();
        Some(PathBuf::from(format!("/proc/fs/jbd2/{dev}-8/info")))
    }

    /// The export of `shared` to 127.0.0.1 as alice, as the lab makes it.
    fn alice_shared(&self) -> ExportSpec {
        ExportSpec {
            workload: "vm-127.0.0.1".into(),
            client: Ipv4Addr::LOCALHOST,
            share: "shared".into(),
            path: self.data("shared"),
            uid: ALICE,
            gid: ALICE,
            groups: vec![ALICE, TEAM],
            readonly: false,
            denied: false,
            mounted: false,
            async_metadata: false,
        }
    }

    /// How many transactions the data's journal has committed.
    fn commits(&self) -> u64 {
        let info = std::fs::read_to_string(self.journal().expect("an ext4 of its own")).unwrap();
        info.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// One raw RPC connection.
struct Client {
    s: TcpStream,
    xid: u32,
}

impl Client {
    /// Sends a call with `xid` and returns its results (after the
    /// accept status, which must be SUCCESS).
    fn call_xid(&mut self, xid: u32, prog: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        self.send(xid, prog, proc_, args);
        let mut rec = Vec::new();
        assert!(coffre_nfs::rpc::read_record(&mut self.s, &mut rec, 4 << 20).unwrap());
        let (got, results) = coffre_nfs::rpc::reply_results(&rec).expect("an accepted call");
        assert_eq!(got, xid);
        results.to_vec()
    }

    /// Sends a call without waiting for its reply.
    fn send(&mut self, xid: u32, prog: u32, proc_: u32, args: &[u8]) {
        let rec = coffre_nfs::rpc::call_record(xid, prog, 3, proc_, args);
        self.s.write_all(&rec).unwrap();
    }

    fn call(&mut self, prog: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        self.xid += 1;
        self.call_xid(self.xid, prog, proc_, args)
    }

    fn mount(&mut self) -> Vec<u8> {
        let mut a = Writer::default();
        a.opaque(b"/");
        let res = self.call(100_005, 1, &a.buf);
        let mut r = Reader::new(&res);
        assert_eq!(r.u32().unwrap(), 0, "MNT3_OK");
        r.opaque(64).unwrap().to_vec()
    }

    fn nfs(&mut self, proc_: u32, args: &Writer) -> (u32, Vec<u8>) {
        let res = self.call(100_003, proc_, &args.buf);
        let mut r = Reader::new(&res);
        (r.u32().unwrap(), r.rest().to_vec())
    }

    fn lookup(&mut self, dir: &[u8], name: &str) -> Result<Vec<u8>, u32> {
        let mut a = Writer::default();
        a.opaque(dir).opaque(name.as_bytes());
        let (st, rest) = self.nfs(3, &a);
        if st != status::OK {
            return Err(st);
        }
        Ok(Reader::new(&rest).opaque(64).unwrap().to_vec())
    }

    fn getattr(&mut self, fh: &[u8]) -> u32 {
        let mut a = Writer::default();
        a.opaque(fh);
        self.nfs(1, &a).0
    }
}

fn nfs_tool(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn a_real_client_writes_reads_and_lists_as_the_share_user() {
    let lab = Lab::new("client");
    let src = lab.dir.join("local.txt");
    let body: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(&src, &body).unwrap();
    let out = nfs_tool(&["nfs-cp", src.to_str().unwrap(), &lab.url("copy.bin")]);
    assert!(
        out.status.success(),
        "nfs-cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made = lab.data("shared/copy.bin");
    let md = std::fs::metadata(&made).unwrap();
    assert_eq!(md.uid(), ALICE, "the file is the share user's, not root's");
    assert_eq!(md.gid(), TEAM, "and has the setgid directory's group");
    assert_eq!(std::fs::read(&made).unwrap(), body);
    let back = lab.dir.join("back.bin");
    let out = nfs_tool(&["nfs-cp", &lab.url("copy.bin"), back.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), body);
    // A file the share user may not read is refused, whatever uid the
    // client claims (libnfs sends root's).
    let out = nfs_tool(&["nfs-cat", &lab.url("root-only")]);
    assert!(!out.status.success(), "root's file was read");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("root's"));
    // A large directory lists every name exactly once (READDIRPLUS
    // paging with the directory's own cookies).
    let many = lab.data("shared/many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..2500 {
        std::fs::write(many.join(format!("file-{i:05}-with-a-longer-name")), b"").unwrap();
    }
    let out = nfs_tool(&["nfs-ls", &lab.url("many")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| n.starts_with("file-"))
        .collect();
    let listed = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!((listed, names.len()), (2500, 2500), "every name once");
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn handles_stay_in_their_export_and_survive_close_and_restart() {
    let lab = Lab::new("handles");
    let mut home = lab.client(Ipv4Addr::new(127, 0, 0, 2));
    let root = home.mount();
    // `..` at the export's root is the root: bob's home is out of reach.
    let up = home.lookup(&root, "..").unwrap();
    assert_eq!(up, root);
    let upup = home.lookup(&up, "..").unwrap();
    assert_eq!(upup, root);
    assert_eq!(home.lookup(&root, "bob"), Err(status::NOENT));
    // A handle of one export is stale in another; a forged one is bad.
    let mut shared = lab.client(Ipv4Addr::LOCALHOST);
    let sroot = shared.mount();
    assert_ne!(sroot, root);
    assert_eq!(shared.getattr(&root), status::STALE);
    let mut forged = root.clone();
    forged[12] ^= 1;
    assert_eq!(home.getattr(&forged), status::BADHANDLE);
    assert_eq!(home.getattr(&[1, 2, 3]), status::BADHANDLE);
    // Closed: no key, no descriptor; calls wait (JUKEBOX), nothing fails.
    lab.server.close();
    assert!(!lab.server.is_open());
    assert_eq!(home.getattr(&root), status::JUKEBOX);
    // A MOUNT is held until the vault opens.
    let mut m = lab.client(Ipv4Addr::new(127, 0, 0, 2));
    let held = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let h = m.mount();
        (h, t.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    lab.open();
    let (h, waited) = held.join().unwrap();
    assert_eq!(h, root, "the same root handle after the open");
    assert!(
        waited >= std::time::Duration::from_millis(500),
        "it was held: {waited:?}"
    );
    assert_eq!(home.getattr(&root), status::OK);
    // Another server process with the same key material (a daemon
    // restart) takes the same handles.
    let again = Server::new();
    again.set_exports(vec![ExportSpec {
        workload: "vm-127.0.0.2".into(),
        client: Ipv4Addr::new(127, 0, 0, 2),
        share: "home/alice".into(),
        path: lab.data("home/alice"),
        uid: ALICE,
        gid: ALICE,
        groups: vec![],
        readonly: false,
        denied: false,
        mounted: false,
        async_metadata: false,
    }]);
    again.open_in_process(HandleKey::new(lab.key));
    let rec = {
        let mut w = Writer::default();
        w.u32(99).u32(0).u32(2).u32(100_003).u32(3).u32(1);
        w.u32(0).u32(0).u32(0).u32(0);
        w.opaque(&root);
        w.buf
    };
    let reply = again.answer(Ipv4Addr::new(127, 0, 0, 2), &rec).unwrap();
    let st = u32::from_be_bytes(reply[28..32].try_into().unwrap());
    assert_eq!(
        st,
        status::OK,
        "a handle from before the restart still opens"
    );
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn retransmitted_remove_and_rename_get_their_first_answer_across_a_close() {
    let lab = Lab::new("drc");
    std::fs::write(lab.data("shared/a"), b"a").unwrap();
    std::fs::write(lab.data("shared/b"), b"b").unwrap();
    chown(&lab.data("shared/a"), ALICE, TEAM, 0o660);
    chown(&lab.data("shared/b"), ALICE, TEAM, 0o660);
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    let mut remove = Writer::default();
    remove.opaque(&root).opaque(b"a");
    let first = c.call_xid(5000, 100_003, 12, &remove.buf);
    assert_eq!(Reader::new(&first).u32().unwrap(), status::OK);
    assert!(!lab.data("shared/a").exists());
    let mut rename = Writer::default();
    rename.opaque(&root).opaque(b"b").opaque(&root).opaque(b"c");
    let first_rename = c.call_xid(5001, 100_003, 14, &rename.buf);
    assert_eq!(Reader::new(&first_rename).u32().unwrap(), status::OK);
    // The reply was "lost": the client reconnects (another port) after a
    // close and an open, and resends both with the same xids.
    lab.server.close();
    lab.open();
    let mut c2 = lab.client(Ipv4Addr::LOCALHOST);
    let again = c2.call_xid(5000, 100_003, 12, &remove.buf);
    assert_eq!(again, first, "the same answer, not NOENT");
    let again = c2.call_xid(5001, 100_003, 14, &rename.buf);
    assert_eq!(again, first_rename, "the same answer, not NOENT");
    assert!(lab.data("shared/c").exists());
    // A new call with another xid runs for real.
    let fresh = c2.call_xid(5002, 100_003, 12, &remove.buf);
    assert_eq!(Reader::new(&fresh).u32().unwrap(), status::NOENT);
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn root_in_the_guest_acts_only_as_the_share_user() {
    let lab = Lab::new("rights");
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    // Create a file: it is alice's.
    let mut create = Writer::default();
    create.opaque(&root).opaque(b"mine").u32(1);
    create
        .bool(true)
        .u32(0o644)
        .bool(false)
        .bool(false)
        .bool(false)
        .u32(0)
        .u32(0);
    let (st, rest) = c.nfs(8, &create);
    assert_eq!(st, status::OK);
    let mut r = Reader::new(&rest);
    assert!(r.bool().unwrap());
    let mine = r.opaque(64).unwrap().to_vec();
    assert_eq!(
        std::fs::metadata(lab.data("shared/mine")).unwrap().uid(),
        ALICE
    );
    // chown to root: refused by the kernel (she is not root).
    let mut setattr = Writer::default();
    setattr
        .opaque(&mine)
        .bool(false)
        .bool(true)
        .u32(0)
        .bool(false)
        .bool(false)
        .u32(0)
        .u32(0)
        .bool(false);
    assert_eq!(c.nfs(2, &setattr).0, status::PERM);
    // chmod root's file: refused.
    let theirs = c.lookup(&root, "root-only").unwrap();
    let mut chmod = Writer::default();
    chmod
        .opaque(&theirs)
        .bool(true)
        .u32(0o666)
        .bool(false)
        .bool(false)
        .bool(false)
        .u32(0)
        .u32(0)
        .bool(false);
    assert_eq!(c.nfs(2, &chmod).0, status::PERM);
    // Read root's file: refused.
    let mut read = Writer::default();
    read.opaque(&theirs).u64(0).u32(100);
    assert_eq!(c.nfs(6, &read).0, status::ACCES);
    // ACCESS says the same.
    let mut access = Writer::default();
    access.opaque(&theirs).u32(0x3f);
    let (st, rest) = c.nfs(4, &access);
    assert_eq!(st, status::OK);
    let mut r = Reader::new(&rest);
    if r.bool().unwrap() {
        r.fixed(84).unwrap();
    }
    assert_eq!(r.u32().unwrap(), 0, "no right at all on root's 0600 file");
    // A member removed: her export refuses everything.
    let mut specs = vec![ExportSpec {
        denied: true,
        ..lab.alice_shared()
    }];
    lab.server.set_exports(specs.clone());
    assert_eq!(c.getattr(&mine), status::ACCES);
    assert_eq!(c.nfs(6, &read).0, status::ACCES);
    specs[0].denied = false;
    specs[0].readonly = true;
    lab.server.set_exports(specs);
    assert_eq!(c.getattr(&mine), status::OK, "same handle, export reopened");
    let mut remove = Writer::default();
    remove.opaque(&root).opaque(b"mine");
    assert_eq!(c.nfs(12, &remove).0, status::ROFS);
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn a_fifo_in_the_share_does_not_hang_a_create() {
    let lab = Lab::new("fifo");
    let fifo = lab.data("shared/fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    chown(&fifo, ALICE, TEAM, 0o660);
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    // UNCHECKED create over the FIFO: refused at once (opening it would
    // wait for a writer forever, with a worker and the close behind it).
    let mut create = Writer::default();
    create.opaque(&root).opaque(b"fifo").u32(0);
    create
        .bool(true)
        .u32(0o644)
        .bool(false)
        .bool(false)
        .bool(false)
        .u32(0)
        .u32(0);
    assert_eq!(c.nfs(8, &create).0, status::EXIST);
    // An existing regular file she may only write: UNCHECKED gives it back.
    std::fs::write(lab.data("shared/wo"), b"x").unwrap();
    chown(&lab.data("shared/wo"), ALICE, TEAM, 0o200);
    let mut create = Writer::default();
    create.opaque(&root).opaque(b"wo").u32(0);
    create
        .bool(false)
        .bool(false)
        .bool(false)
        .bool(false)
        .u32(0)
        .u32(0);
    assert_eq!(c.nfs(8, &create).0, status::OK);
    // And the close does not wait for anything.
    let t = std::time::Instant::now();
    lab.server.close();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

/// MKNOD's arguments: where, then a FIFO's or socket's type and
/// attributes (mode only), or a device's with its numbers.
fn mknod_args(dir: &[u8], name: &str, ftype: u32) -> Writer {
    let mut a = Writer::default();
    a.opaque(dir).opaque(name.as_bytes()).u32(ftype);
    if matches!(ftype, 3 | 4 | 6 | 7) {
        a.bool(true)
            .u32(0o640)
            .bool(false)
            .bool(false)
            .bool(false)
            .u32(0)
            .u32(0);
    }
    if matches!(ftype, 3 | 4) {
        a.u32(1).u32(3);
    }
    a
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn a_guest_makes_renames_and_links_fifos_and_sockets_but_no_device() {
    use std::os::unix::fs::FileTypeExt;
    let lab = Lab::new("mknod");
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    for (name, ftype) in [("fifo", 7), ("sock", 6)] {
        let (st, _) = c.nfs(11, &mknod_args(&root, name, ftype));
        assert_eq!(st, status::OK, "MKNOD {name}");
        let m = std::fs::symlink_metadata(lab.data(&format!("shared/{name}"))).unwrap();
        let kind = m.file_type();
        assert!(
            if ftype == 7 {
                kind.is_fifo()
            } else {
                kind.is_socket()
            },
            "{name}: {kind:?}"
        );
        // The share's user's, in the share's group (setgid directory),
        // with the mode asked for.
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (ALICE, TEAM, 0o640));
        // Renamed and linked as any file (what `mv` and `ln` do).
        let mut rename = Writer::default();
        rename
            .opaque(&root)
            .opaque(name.as_bytes())
            .opaque(&root)
            .opaque(format!("{name}-moved").as_bytes());
        assert_eq!(c.nfs(14, &rename).0, status::OK, "RENAME {name}");
        let moved = c.lookup(&root, &format!("{name}-moved")).unwrap();
        let mut link = Writer::default();
        link.opaque(&moved).opaque(&root).opaque(name.as_bytes());
        assert_eq!(c.nfs(15, &link).0, status::OK, "LINK {name}");
        let m = std::fs::symlink_metadata(lab.data(&format!("shared/{name}-moved"))).unwrap();
        assert_eq!(m.nlink(), 2, "{name}");
    }
    // Never a device (PERM: EPERM in the guest), nor a regular file or
    // directory through MKNOD.
    for ftype in [3, 4, 1, 2, 5] {
        let name = format!("dev{ftype}");
        let (st, _) = c.nfs(11, &mknod_args(&root, &name, ftype));
        let want = if matches!(ftype, 3 | 4) {
            status::PERM
        } else {
            status::BADTYPE
        };
        assert_eq!(st, want, "MKNOD type {ftype}");
        assert!(!lab.data(&format!("shared/{name}")).exists());
    }
    // A name taken, and a directory she may not write in.
    assert_eq!(c.nfs(11, &mknod_args(&root, "fifo", 7)).0, status::EXIST);
    let mut c2 = lab.client(Ipv4Addr::new(127, 0, 0, 2));
    let home = c2.mount();
    assert_eq!(c2.nfs(11, &mknod_args(&home, "fifo", 7)).0, status::OK);
    assert!(
        std::fs::symlink_metadata(lab.data("home/alice/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    std::fs::set_permissions(
        lab.data("home/alice"),
        std::fs::Permissions::from_mode(0o500),
    )
    .unwrap();
    assert_eq!(c2.nfs(11, &mknod_args(&home, "fifo2", 7)).0, status::ACCES);
}

/// A sattr3 with only a mode (or nothing) and the rest left alone.
fn sattr(w: &mut Writer, mode: Option<u32>, size: Option<u64>) {
    match mode {
        Some(m) => w.bool(true).u32(m),
        None => w.bool(false),
    };
    w.bool(false).bool(false);
    match size {
        Some(n) => w.bool(true).u64(n),
        None => w.bool(false),
    };
    w.u32(0).u32(0);
}

impl Client {
    fn write(&mut self, fh: &[u8], offset: u64, data: &[u8]) -> u32 {
        self.write_verf(fh, offset, data).0
    }

    /// A WRITE's status and, when done, its verifier.
    fn write_verf(&mut self, fh: &[u8], offset: u64, data: &[u8]) -> (u32, [u8; 8]) {
        let mut a = Writer::default();
        a.opaque(fh)
            .u64(offset)
            .u32(u32::try_from(data.len()).unwrap())
            .u32(0)
            .opaque(data);
        let (st, rest) = self.nfs(7, &a);
        let mut verf = [0; 8];
        if st == status::OK {
            let mut r = Reader::new(&rest);
            if r.bool().unwrap() {
                r.fixed(24).unwrap();
            }
            if r.bool().unwrap() {
                r.fixed(84).unwrap();
            }
            r.u32().unwrap();
            r.u32().unwrap();
            verf.copy_from_slice(r.fixed(8).unwrap());
        }
        (st, verf)
    }

    fn read(&mut self, fh: &[u8]) -> Result<Vec<u8>, u32> {
        let mut a = Writer::default();
        a.opaque(fh).u64(0).u32(4096);
        let (st, rest) = self.nfs(6, &a);
        if st != status::OK {
            return Err(st);
        }
        let mut r = Reader::new(&rest);
        if r.bool().unwrap() {
            r.fixed(84).unwrap();
        }
        r.u32().unwrap();
        r.bool().unwrap();
        Ok(r.opaque(4096).unwrap().to_vec())
    }

    /// CREATE UNCHECKED with a mode: its status.
    fn create(&mut self, dir: &[u8], name: &str, mode: u32) -> u32 {
        let mut a = Writer::default();
        a.opaque(dir).opaque(name.as_bytes()).u32(0);
        sattr(&mut a, Some(mode), None);
        self.nfs(8, &a).0
    }

    /// REMOVE: its status.
    fn remove(&mut self, dir: &[u8], name: &str) -> u32 {
        let mut a = Writer::default();
        a.opaque(dir).opaque(name.as_bytes());
        self.nfs(12, &a).0
    }

    fn setattr(&mut self, fh: &[u8], mode: Option<u32>, size: Option<u64>) -> u32 {
        let mut a = Writer::default();
        a.opaque(fh);
        sattr(&mut a, mode, size);
        a.bool(false);
        self.nfs(2, &a).0
    }
}

/// As knfsd: the owner reads and writes a file whatever its mode says
/// (the client checked it at open): `git` writes the object it made
/// 0444 (CREATE, then WRITE), `tar` the read-only file it unpacks, a
/// program the file it `fchmod`ed to 0. The mode is left as it was.
/// Nobody else gets past the mode.
#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn the_owner_reads_and_writes_whatever_the_mode_as_knfsd_lets_it() {
    let lab = Lab::new("owner");
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    let mode = |rel: &str| std::fs::metadata(lab.data(rel)).unwrap().mode() & 0o7777;
    // UNCHECKED create with mode 0444, then writes: as git and tar do.
    assert_eq!(c.create(&root, "object", 0o444), status::OK);
    assert_eq!(mode("shared/object"), 0o444);
    let fh = c.lookup(&root, "object").unwrap();
    assert_eq!(c.write(&fh, 0, b"blob 5\0hello"), status::OK);
    assert_eq!(c.read(&fh).unwrap(), b"blob 5\0hello");
    assert_eq!(mode("shared/object"), 0o444, "the mode is put back");
    // Mode 0: read (by the server itself: the mode and the ctime stay),
    // written, truncated, committed by its owner.
    assert_eq!(c.setattr(&fh, Some(0), None), status::OK);
    let ctime = || {
        let m = std::fs::metadata(lab.data("shared/object")).unwrap();
        (m.ctime(), m.ctime_nsec())
    };
    let before = ctime();
    assert_eq!(c.read(&fh).unwrap(), b"blob 5\0hello");
    assert_eq!(ctime(), before, "a read changed the file");
    assert_eq!(c.write(&fh, 0, b"HELLO"), status::OK);
    assert_eq!(c.read(&fh).unwrap(), b"HELLO5\0hello");
    assert_eq!(c.setattr(&fh, None, Some(5)), status::OK);
    assert_eq!(c.read(&fh).unwrap(), b"HELLO");
    let mut commit = Writer::default();
    commit.opaque(&fh).u64(0).u32(0);
    assert_eq!(c.nfs(21, &commit).0, status::OK);
    assert_eq!(mode("shared/object"), 0, "the mode is put back");
    assert_eq!(std::fs::read(lab.data("shared/object")).unwrap(), b"HELLO");
    // Another's file: the mode decides, as before (her group may read
    // it, nobody write it), and it is left alone.
    std::fs::write(lab.data("shared/bobs"), b"bob's").unwrap();
    chown(&lab.data("shared/bobs"), BOB, TEAM, 0o440);
    let bobs = c.lookup(&root, "bobs").unwrap();
    assert_eq!(c.read(&bobs).unwrap(), b"bob's");
    assert_eq!(c.write(&bobs, 0, b"alice"), status::ACCES);
    assert_eq!(c.setattr(&bobs, None, Some(0)), status::ACCES);
    chown(&lab.data("shared/bobs"), BOB, TEAM, 0o400);
    assert_eq!(c.read(&bobs), Err(status::ACCES));
    assert_eq!(mode("shared/bobs"), 0o400);
    assert_eq!(std::fs::read(lab.data("shared/bobs")).unwrap(), b"bob's");
    // Her setgid file of a group she is not in: her chmod would drop the
    // bit, so the write is refused and the mode left whole.
    std::fs::write(lab.data("shared/sgid"), b"x").unwrap();
    chown(&lab.data("shared/sgid"), ALICE, 7777, 0o2444);
    let sgid = c.lookup(&root, "sgid").unwrap();
    assert_eq!(c.write(&sgid, 0, b"y"), status::ACCES);
    assert_eq!(mode("shared/sgid"), 0o2444);
    assert_eq!(c.read(&sgid).unwrap(), b"x");
}

/// A WRITE verifier holds for an open of the vault and changes at the
/// next: what a close could not flush is sent again by the clients.
#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn the_write_verifier_changes_at_each_open() {
    let lab = Lab::new("verifier");
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    assert_eq!(c.create(&root, "v", 0o640), status::OK);
    let fh = c.lookup(&root, "v").unwrap();
    let (st, first) = c.write_verf(&fh, 0, b"one");
    assert_eq!(st, status::OK);
    assert_eq!(c.write_verf(&fh, 3, b"two"), (status::OK, first));
    lab.server.close();
    assert!(lab.open().is_empty());
    let (st, second) = c.write_verf(&fh, 6, b"three");
    assert_eq!(st, status::OK);
    assert_ne!(second, first);
}

/// Every call that changes a name or an attribute is on stable storage
/// before its reply, as RFC 1813 asks and knfsd's default exports do (the
/// Linux client's fsync of a directory sends nothing): each commits the
/// data's journal, whose own periodic commit is out of the way.
#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn names_and_attributes_are_durable_before_the_reply() {
    let lab = Lab::on("durable", true);
    let mut c = lab.client(Ipv4Addr::LOCALHOST);
    let root = c.mount();
    let step = |what: &str, c: &mut Client, proc_: u32, args: Writer| {
        let before = lab.commits();
        assert_eq!(c.nfs(proc_, &args).0, status::OK, "{what}");
        assert!(lab.commits() > before, "{what} replied before a commit");
    };
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"f").u32(0);
    sattr(&mut a, Some(0o640), None);
    step("CREATE", &mut c, 8, a);
    let f = c.lookup(&root, "f").unwrap();
    let mut a = Writer::default();
    a.opaque(&f);
    sattr(&mut a, Some(0o600), None);
    a.bool(false);
    step("SETATTR", &mut c, 2, a);
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"d");
    sattr(&mut a, Some(0o750), None);
    step("MKDIR", &mut c, 9, a);
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"l");
    sattr(&mut a, None, None);
    a.opaque(b"f");
    step("SYMLINK", &mut c, 10, a);
    step("MKNOD", &mut c, 11, mknod_args(&root, "p", 7));
    let d = c.lookup(&root, "d").unwrap();
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"f").opaque(&d).opaque(b"g");
    step("RENAME", &mut c, 14, a);
    let g = c.lookup(&d, "g").unwrap();
    let mut a = Writer::default();
    a.opaque(&g).opaque(&root).opaque(b"h");
    step("LINK", &mut c, 15, a);
    let mut a = Writer::default();
    a.opaque(&d).opaque(b"g");
    step("REMOVE", &mut c, 12, a);
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"h");
    step("REMOVE", &mut c, 12, a);
    let mut a = Writer::default();
    a.opaque(&root).opaque(b"d");
    step("RMDIR", &mut c, 13, a);
    // `share_async`: answered before any commit.
    lab.server.set_exports(vec![ExportSpec {
        async_metadata: true,
        ..lab.alice_shared()
    }]);
    // (Up to three tries: a `sync` run by anyone else meanwhile commits
    // too.)
    let committed = (0..3).all(|_| {
        let before = lab.commits();
        assert_eq!(c.create(&root, "quick", 0o640), status::OK);
        assert_eq!(c.remove(&root, "quick"), status::OK);
        lab.commits() != before
    });
    assert!(!committed, "an async export committed, three times");
}

#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn a_guest_cannot_take_every_connection_or_worker() {
    let lab = Lab::new("fair");
    // A 1 MiB file in alice's home, for READs.
    std::fs::write(lab.data("home/alice/big"), vec![7u8; 1 << 20]).unwrap();
    chown(&lab.data("home/alice/big"), ALICE, ALICE, 0o600);
    let mut greedy = lab.client(Ipv4Addr::new(127, 0, 0, 2));
    let root = greedy.mount();
    let big = greedy.lookup(&root, "big").unwrap();
    // 60 READs of 1 MiB sent, none of their replies read.
    for i in 0..60u32 {
        let mut a = Writer::default();
        a.opaque(&big).u64(0).u32(1 << 20);
        let mut w = Writer::default();
        w.u32(0)
            .u32(90_000 + i)
            .u32(0)
            .u32(2)
            .u32(100_003)
            .u32(3)
            .u32(6);
        w.u32(0).u32(0).u32(0).u32(0);
        w.buf.extend_from_slice(&a.buf);
        let n = u32::try_from(w.buf.len() - 4).unwrap() | 0x8000_0000;
        w.buf[..4].copy_from_slice(&n.to_be_bytes());
        greedy.s.write_all(&w.buf).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Another VM is still served at once.
    let mut other = lab.client(Ipv4Addr::LOCALHOST);
    let t = std::time::Instant::now();
    let sroot = other.mount();
    assert_eq!(other.getattr(&sroot), status::OK);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    // Connections per address are bounded: with `other`'s, eight; the
    // ninth is closed at once, and the eight still work.
    let mut extra: Vec<Client> = (0..7).map(|_| lab.client(Ipv4Addr::LOCALHOST)).collect();
    let mut ninth = lab.client(Ipv4Addr::LOCALHOST);
    let mut b = [0u8; 4];
    assert_eq!(std::io::Read::read(&mut ninth.s, &mut b).unwrap_or(0), 0);
    assert_eq!(extra[6].getattr(&sroot), status::OK);
    drop(extra);
    // An address no export has is refused outright.
    let mut stranger = lab.client(Ipv4Addr::new(127, 0, 0, 3));
    assert_eq!(std::io::Read::read(&mut stranger.s, &mut b).unwrap_or(0), 0);
}

/// An export the daemon mounted for the server (`mounted`) opens only
/// while something is mounted there: the empty mount point a failed
/// mount leaves, on the host's own disk, is never served.
#[test]
#[ignore = "system: needs root"]
fn an_export_that_must_be_mounted_is_not_served_from_an_empty_mount_point() {
    coffre_testkit::require(&[Need::Root]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nfs-mounted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (share, at) = (dir.join("shared"), dir.join("share-0"));
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(share.join("a"), "x").unwrap();
    let spec = ExportSpec {
        workload: "vm".into(),
        client: Ipv4Addr::LOCALHOST,
        share: "shared".into(),
        path: at.clone(),
        uid: ALICE,
        gid: ALICE,
        groups: Vec::new(),
        readonly: false,
        denied: false,
        mounted: true,
        async_metadata: false,
    };
    let e =
        coffre_nfs::fs::open_root(&spec).expect_err("an empty mount point was opened as the share");
    assert!(e.to_string().contains("shared is not mounted"), "{e}");
    let mount = |args: &[&std::ffi::OsStr]| {
        assert!(
            Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success()
        );
    };
    mount(&[
        "mount".as_ref(),
        "--bind".as_ref(),
        share.as_os_str(),
        at.as_os_str(),
    ]);
    let opened = coffre_nfs::fs::open_root(&spec).map(drop);
    mount(&["umount".as_ref(), at.as_os_str()]);
    let _ = std::fs::remove_dir_all(&dir);
    opened.expect("the mounted share opens");
}

/// The portmapper's UDP socket carries the mark the vault's firewall
/// knows it by (set as root; the server could not change it).
#[test]
#[ignore = "system: needs root"]
fn the_portmappers_udp_socket_is_marked() {
    coffre_testkit::require(&[Need::Root]);
    let sockets = Sockets::bind(&Listen {
        addr: Ipv4Addr::LOCALHOST,
        nfs_port: 0,
        portmap_port: Some(0),
        udp_mark: Some(0x00c0_ffee),
        device: None,
    })
    .unwrap();
    let fds = sockets.into_fds();
    assert_eq!(fds.len(), 3, "NFS, portmapper TCP and UDP");
    let udp = socket2::Socket::from(fds.into_iter().nth(2).unwrap());
    assert_eq!(udp.r#type().unwrap(), socket2::Type::DGRAM);
    assert_eq!(udp.mark().unwrap(), 0x00c0_ffee);
}

/// Each VM's server's sockets take that VM's link's connections alone:
/// two sets bound to the same address and ports, each on a link of its
/// own (`SO_BINDTODEVICE`), and a connection (TCP, and a portmapper's
/// datagram) through each link reaches the set bound to it, never the
/// other.
#[test]
#[ignore = "system: needs root and network namespaces"]
fn sockets_bound_to_a_link_take_that_links_connections_alone() {
    use std::os::fd::{AsFd, OwnedFd};
    use std::process::Command;
    coffre_testkit::require(&[Need::Root, Need::NetNs]);
    let tag = format!("{:04x}", std::process::id() & 0xffff);
    let srv = format!("cnfs-s{tag}");
    let cli = |i: u32| format!("cnfs-c{i}{tag}");
    let ip = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    struct Gone(Vec<String>);
    impl Drop for Gone {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }
    let _gone = Gone(vec![srv.clone(), cli(1), cli(2)]);
    ip(&["netns", "add", &srv]);
    for i in 1..=2 {
        let (s, c, me) = (
            format!("s{i}{tag}"),
            format!("c{i}{tag}"),
            format!("10.77.0.{i}0"),
        );
        ip(&["netns", "add", &cli(i)]);
        ip(&[
            "link",
            "add",
            &s,
            "netns",
            &srv,
            "type",
            "veth",
            "peer",
            "name",
            &c,
            "netns",
            &cli(i),
        ]);
        ip(&["-n", &srv, "addr", "add", "10.77.0.1/32", "dev", &s]);
        ip(&["-n", &srv, "link", "set", &s, "up"]);
        ip(&["-n", &srv, "route", "add", &format!("{me}/32"), "dev", &s]);
        ip(&["-n", &cli(i), "addr", "add", &format!("{me}/32"), "dev", &c]);
        ip(&["-n", &cli(i), "link", "set", &c, "up"]);
        ip(&["-n", &cli(i), "route", "add", "10.77.0.1/32", "dev", &c]);
    }
    // Bound inside the server's namespace, by a thread that joined it.
    let ns = std::fs::File::open(format!("/run/netns/{srv}")).unwrap();
    let links = [format!("s1{tag}"), format!("s2{tag}")];
    let sets: Vec<Vec<OwnedFd>> = std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        links
            .iter()
            .map(|l| {
                Sockets::bind(&Listen {
                    addr: Ipv4Addr::new(10, 77, 0, 1),
                    nfs_port: 2049,
                    portmap_port: Some(111),
                    udp_mark: None,
                    device: Some(l.clone()),
                })
                .unwrap_or_else(|e| panic!("binding on {l}: {e}"))
                .into_fds()
            })
            .collect()
    })
    .join()
    .unwrap();
    let sets: Vec<(std::net::TcpListener, std::net::UdpSocket)> = sets
        .into_iter()
        .map(|fds| {
            let mut it = fds.into_iter();
            let tcp = std::net::TcpListener::from(it.next().unwrap());
            let _portmap_tcp = it.next().unwrap();
            let udp = std::net::UdpSocket::from(it.next().unwrap());
            tcp.set_nonblocking(true).unwrap();
            udp.set_nonblocking(true).unwrap();
            (tcp, udp)
        })
        .collect();
    for i in 1..=2u32 {
        let probe = "import socket\n\
            s = socket.create_connection(('10.77.0.1', 2049), timeout=5)\n\
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
            u.sendto(b'probe', ('10.77.0.1', 111))\n";
        let st = Command::new("ip")
            .args(["netns", "exec", &cli(i), "python3", "-c", probe])
            .status()
            .unwrap();
        assert!(st.success(), "client {i} could not connect");
        std::thread::sleep(std::time::Duration::from_millis(200));
        for (j, (tcp, udp)) in sets.iter().enumerate() {
            let mine = j + 1 == i as usize;
            let accepted = tcp.accept().map(|(_, from)| from.ip());
            let mut buf = [0u8; 16];
            let got = udp
                .recv_from(&mut buf)
                .map(|(n, from)| (buf[..n].to_vec(), from.ip()));
            let me: std::net::IpAddr =
                Ipv4Addr::new(10, 77, 0, u8::try_from(i * 10).unwrap()).into();
            if mine {
                assert_eq!(
                    accepted.ok(),
                    Some(me),
                    "link {i}'s connection, set {}",
                    j + 1
                );
                assert_eq!(
                    got.ok(),
                    Some((b"probe".to_vec(), me)),
                    "link {i}'s datagram"
                );
            } else {
                assert!(
                    accepted.is_err(),
                    "link {i}'s connection reached set {}",
                    j + 1
                );
                assert!(got.is_err(), "link {i}'s datagram reached set {}", j + 1);
            }
        }
    }
}

/// The handle broker opens only handles it made, under its key, for the
/// export they were made for, of files on the data's filesystem; a
/// directory only while it lies under the export; reads for an owner
/// only what the export's user owns.
#[test]
#[ignore = "system: needs root and libnfs-utils"]
fn the_broker_opens_only_its_own_handles_of_the_exports_files() {
    use coffre_nfs::broker::Handles;
    use coffre_nfs::handle;
    use std::os::fd::AsFd;
    let lab = Lab::new("broker");
    let (keeper, failed) = Keeper::open(HandleKey::new(lab.key), &lab.specs);
    assert!(failed.is_empty(), "{failed:?}");
    let tag = |s: &ExportSpec| handle::export_tag(&s.workload, &s.share);
    let (shared, home) = (tag(&lab.specs[0]), tag(&lab.specs[1]));
    let path = |p: &Path| {
        rustix::fs::open(p, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap()
    };
    let ino = |fd: &std::os::fd::OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
    std::fs::write(lab.data("shared/f"), b"alice's").unwrap();
    chown(&lab.data("shared/f"), ALICE, TEAM, 0o200);
    let f = path(&lab.data("shared/f"));
    // Made and opened again.
    let h = keeper.mint(shared, f.as_fd()).unwrap();
    assert_eq!(ino(&keeper.open(shared, &h).unwrap()), ino(&f));
    // Not in another export, not altered, not under another key.
    assert_eq!(keeper.open(home, &h).err(), Some(status::STALE));
    let mut forged = h.clone();
    forged[20] ^= 1;
    assert_eq!(keeper.open(shared, &forged).err(), Some(status::BADHANDLE));
    let fh = coffre_sys::handle::FileHandle::of(
        path(&lab.data("home/bob/secret")).as_fd(),
        Path::new(""),
    )
    .unwrap();
    let theirs = handle::encode(&HandleKey::new([1; 32]), shared, &fh).unwrap();
    assert_eq!(keeper.open(shared, &theirs).err(), Some(status::BADHANDLE));
    // Nothing off the data's filesystem gets a handle, nor a file of
    // another export, nor one moved out of its export.
    let elsewhere = path(Path::new("/proc/self/status"));
    assert_eq!(
        keeper.mint(shared, elsewhere.as_fd()).err(),
        Some(status::SERVERFAULT)
    );
    assert_eq!(
        keeper.mint(home, f.as_fd()).err(),
        Some(status::STALE),
        "a file of the shared directory under alice's home's export"
    );
    std::fs::write(lab.data("shared/leaving"), b"x").unwrap();
    let leaving = path(&lab.data("shared/leaving"));
    std::fs::rename(lab.data("shared/leaving"), lab.data("home/bob/left")).unwrap();
    assert_eq!(
        keeper.mint(shared, leaving.as_fd()).err(),
        Some(status::STALE),
        "a file no longer in the share"
    );
    // A directory moved out of the share is no longer opened.
    std::fs::create_dir(lab.data("shared/d")).unwrap();
    let d = keeper
        .mint(shared, path(&lab.data("shared/d")).as_fd())
        .unwrap();
    assert!(keeper.open(shared, &d).is_ok());
    std::fs::rename(lab.data("shared/d"), lab.data("home/bob/d")).unwrap();
    assert_eq!(keeper.open(shared, &d).err(), Some(status::STALE));
    // The owner's read: alice's write-only file, not root's.
    let mut read = String::new();
    std::io::Read::read_to_string(
        &mut std::fs::File::from(keeper.read_as_owner(shared, f.as_fd()).unwrap()),
        &mut read,
    )
    .unwrap();
    assert_eq!(read, "alice's");
    let roots = path(&lab.data("shared/root-only"));
    assert_eq!(
        keeper.read_as_owner(shared, roots.as_fd()).err(),
        Some(status::ACCES)
    );
    // An export it does not know.
    assert_eq!(keeper.open([0; 8], &h).err(), Some(status::STALE));
}
