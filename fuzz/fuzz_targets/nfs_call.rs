//! A TCP stream from a guest, through the NFS server's record framing,
//! RPC header, and the NFSv3, MOUNT and portmapper argument decoders;
//! every file handle found is also decoded. Nothing may panic, a record
//! never exceeds its bound, and a handle that decodes is one the key made.
//! Seeds: a NULL, a MNT, a GETATTR, a WRITE, a READDIRPLUS and a RENAME
//! as a client sends them.
#![no_main]

use coffre_nfs::handle::{self, HandleKey};
use coffre_nfs::{proto, rpc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = HandleKey::new([3; 32]);
    let tag = handle::export_tag("vm", "shared");
    let mut src = data;
    let mut rec = Vec::new();
    while let Ok(true) = rpc::read_record(&mut src, &mut rec, rpc::MAX_RECORD) {
        assert!(rec.len() <= rpc::MAX_RECORD);
        let Ok((call, args)) = rpc::parse_call(&rec) else {
            continue;
        };
        match call.prog {
            rpc::PROG_NFS => {
                if let Ok(Some(c)) = proto::decode_nfs(call.proc_, args) {
                    let _ = c.is_idempotent();
                    for fh in handles(&c) {
                        if let Ok(inner) = handle::decode(&key, tag, fh) {
                            // Only the key makes handles that decode.
                            assert_eq!(handle::encode(&key, tag, &inner).as_deref(), Some(fh));
                        }
                    }
                }
            }
            rpc::PROG_MOUNT => {
                let _ = proto::decode_mount(call.proc_, args);
            }
            _ => {
                let _ = proto::decode_getport(args);
            }
        }
    }
});

fn handles<'a>(c: &proto::Nfs<'a>) -> Vec<&'a [u8]> {
    use proto::Nfs::*;
    match *c {
        Null => vec![],
        Getattr(f)
        | Setattr(f, ..)
        | Access(f, _)
        | Readlink(f)
        | Read(f, ..)
        | Fsstat(f)
        | Fsinfo(f)
        | Pathconf(f)
        | Commit(f) => vec![f],
        Write { fh, .. } => vec![fh],
        Lookup(d, _)
        | Create(d, ..)
        | Mkdir(d, ..)
        | Symlink(d, ..)
        | Mknod(d, ..)
        | Remove(d, _)
        | Rmdir(d, _) => vec![d],
        Readdir { dir, .. } | Readdirplus { dir, .. } => vec![dir],
        Rename(a, _, b, _) | Link(a, b, _) => vec![a, b],
    }
}
