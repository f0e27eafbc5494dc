//! What the store and mirror tests share: the volume's shape, a sealed
//! integrity key, and snapshots of an in-memory store.

// Each test crate uses its part.
#![allow(dead_code)]

use bytes::Bytes;
use coffre_remote::{ChunkStore, Geometry, IntegrityKey, Objects, RemoteError, Root};
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const VAULT: [u8; 16] = *b"test-vault-id-01";
pub const PREFIX: &str = "team";
pub const CHUNK: u32 = 64 * 1024;
pub const SIZE: u64 = 8 * 65536;

/// A client of the NBD export at `url` (20 s time limit).
pub fn nbd_client(
    url: &str,
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
) -> Arc<coffre_remote::nbd::NbdClient> {
    let (addr, export, _) = coffre_remote::nbd::parse_url(url).unwrap();
    Arc::new(coffre_remote::nbd::NbdClient::new(
        coffre_remote::nbd::NbdSettings {
            addr,
            export,
            tls,
            timeout: std::time::Duration::from_secs(20),
        },
    ))
}

/// The chunk store's objects on that client's export.
pub fn nbd_objects(
    c: &Arc<coffre_remote::nbd::NbdClient>,
) -> Arc<coffre_remote::blocks::BlockObjects> {
    Arc::new(coffre_remote::blocks::BlockObjects::new(c.clone()))
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A sealed integrity key, reopened for each use (as the daemon would
/// from the control directory).
pub struct Keyring {
    sealed: Vec<u8>,
}

impl Keyring {
    pub fn new() -> Self {
        let k = IntegrityKey::generate().unwrap();
        Keyring {
            sealed: k.seal(b"the volume key", &VAULT).unwrap(),
        }
    }
    pub fn key(&self) -> IntegrityKey {
        IntegrityKey::unseal(&self.sealed, b"the volume key", &VAULT).unwrap()
    }
}

/// A new store on `objects` whose chunks are MACed `how`'s way, and its
/// first root.
pub async fn created_with(
    objects: Arc<dyn Objects>,
    keys: &Keyring,
    g: Geometry,
    how: coffre_remote::integrity::ChunkMac,
) -> (ChunkStore, Root) {
    ChunkStore::create_with_chunk_mac(
        vec![coffre_remote::Backend {
            name: "the store".into(),
            objects,
        }],
        coffre_remote::MirrorSettings::default(),
        PREFIX,
        (VAULT, keys.key()),
        (g, how),
    )
    .await
    .unwrap()
}

pub fn geometry() -> Geometry {
    Geometry::new(CHUNK, SIZE).unwrap()
}

pub fn chunk(fill: u8) -> Vec<u8> {
    vec![fill; CHUNK as usize]
}

/// Every object in the store, by name.
pub async fn snapshot(mem: &InMemory) -> BTreeMap<String, Bytes> {
    let mut out = BTreeMap::new();
    let mut list = mem.list(None);
    while let Some(meta) = list.next().await {
        let meta = meta.unwrap();
        let bytes = mem
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        out.insert(meta.location.to_string(), bytes);
    }
    out
}

/// The store made exactly `snap` again.
pub async fn restore(mem: &InMemory, snap: &BTreeMap<String, Bytes>) {
    let now = snapshot(mem).await;
    for name in now.keys() {
        if !snap.contains_key(name) {
            mem.delete(&Path::from(name.as_str())).await.unwrap();
        }
    }
    for (name, bytes) in snap {
        mem.put(&Path::from(name.as_str()), PutPayload::from(bytes.clone()))
            .await
            .unwrap();
    }
}

/// A new volume of the test's shape on `objects`, under [`PREFIX`].
pub async fn created(objects: Arc<dyn Objects>, keys: &Keyring) -> ChunkStore {
    ChunkStore::create(objects, PREFIX, VAULT, keys.key(), geometry())
        .await
        .unwrap()
        .0
}

/// `chunks` written and flushed, the root kept (as the daemon keeps it
/// locally).
pub async fn kept(s: &mut ChunkStore, chunks: Vec<(u64, Vec<u8>)>) -> Root {
    s.write_chunks(chunks).await.unwrap();
    let root = s.flush().await.unwrap().unwrap();
    s.root_kept(root);
    root
}

/// The volume on `objects`, checked against `root`.
pub async fn opened(
    objects: Arc<dyn Objects>,
    keys: &Keyring,
    root: Root,
) -> Result<ChunkStore, RemoteError> {
    ChunkStore::open(objects, PREFIX, VAULT, keys.key(), Some(root), false)
        .await
        .map(|(s, _)| s)
}

/// In an `impl Objects` for a wrapper with an `inner` store: the methods
/// named (`get`, `put`, `delete`, `durable`, `prepare`, `opened`, `list`) passed on
/// to it as they are.
// Each test crate uses its part.
#[allow(unused_macros)]
macro_rules! forward {
    ($($m:ident),*) => { $(common::forward!(@ $m);)* };
    (@ get) => {
        fn get<'a>(
            &'a self,
            key: &'a str,
            max: usize,
        ) -> coffre_remote::objects::BoxFuture<
            'a,
            Result<Option<(bytes::Bytes, coffre_remote::objects::Tag)>, coffre_remote::objects::StoreError>,
        > {
            self.inner.get(key, max)
        }
    };
    (@ put) => {
        fn put<'a>(
            &'a self,
            key: &'a str,
            data: bytes::Bytes,
            mode: coffre_remote::objects::Put,
        ) -> coffre_remote::objects::BoxFuture<
            'a,
            Result<coffre_remote::objects::Tag, coffre_remote::objects::StoreError>,
        > {
            self.inner.put(key, data, mode)
        }
    };
    (@ delete) => {
        fn delete<'a>(
            &'a self,
            key: &'a str,
        ) -> coffre_remote::objects::BoxFuture<'a, Result<(), coffre_remote::objects::StoreError>> {
            self.inner.delete(key)
        }
    };
    (@ durable) => {
        fn durable(&self, names: &mut dyn Iterator<Item = coffre_remote::layout::Name>) {
            self.inner.durable(names);
        }
    };
    (@ prepare) => {
        fn prepare<'a>(
            &'a self,
            geometry: &'a coffre_remote::layout::Geometry,
        ) -> coffre_remote::objects::BoxFuture<'a, Result<(), coffre_remote::RemoteError>> {
            self.inner.prepare(geometry)
        }
    };
    (@ opened) => {
        fn opened<'a>(
            &'a self,
            geometry: &'a coffre_remote::layout::Geometry,
        ) -> coffre_remote::objects::BoxFuture<'a, Result<(), coffre_remote::RemoteError>> {
            self.inner.opened(geometry)
        }
    };
    (@ list) => {
        fn list<'a>(
            &'a self,
            prefix: &'a str,
            max: usize,
            keep: coffre_remote::objects::Keep<'a>,
        ) -> coffre_remote::objects::BoxFuture<'a, coffre_remote::objects::Listing> {
            self.inner.list(prefix, max, keep)
        }
    };
}
#[allow(unused_imports)]
pub(crate) use forward;
