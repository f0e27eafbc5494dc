//! The few operations coffre asks of an object store, and their mapping
//! onto `object_store` (S3, GCS, Azure, local, in memory).

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, so that [`Objects`] can be used as `dyn Objects`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What identifies one version of an object, for a conditional put.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    /// The HTTP entity tag.
    pub e_tag: Option<String>,
    /// The store's version id, where it has one.
    pub version: Option<String>,
}

/// A put's precondition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Put {
    /// Whatever is there.
    Overwrite,
    /// Only if nothing is there.
    Create,
    /// Only if what is there is this version.
    Update(Tag),
}

/// What went wrong with a store operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `Put::Create` found an object there.
    #[error("the object already exists")]
    AlreadyExists,
    /// `Put::Update` found another version there.
    #[error("the object changed (conditional put refused)")]
    Precondition,
    /// The store does not do this (conditional puts, most often).
    #[error("the store does not support this: {0}")]
    Unsupported(String),
    /// Anything else: network, server errors, permissions.
    #[error("{0}")]
    Other(String),
}

/// An object store, as coffre uses it.
pub trait Objects: Send + Sync {
    /// The object at `key` and its version; `None` if there is none. An
    /// object larger than `max` bytes is refused before its body is read
    /// (a store cannot make the vault allocate what it likes).
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>>;
    /// Puts `data` at `key` if `mode` allows; the new version.
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>>;
    /// Deletes `key` (absent is fine).
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Whether `key` is there (without its body where the store can).
    fn exists<'a>(&'a self, key: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.get(key, max).await?.is_some()) })
    }
    // The four below have no default on purpose: a wrapper that forgot
    // to pass one on would fail quietly (a block device's durable slots
    // written over, its layout not made or not checked, a store never
    // swept).

    /// The chunks and pages the durable manifest names (a block device
    /// never writes over their slots); nothing for an object store, whose
    /// names are never reused.
    fn durable(&self, names: &mut dyn Iterator<Item = crate::layout::Name>);
    /// Readies the store for a new volume of `geometry` (a block device
    /// lays out its slots); nothing for an object store.
    fn prepare<'a>(
        &'a self,
        geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>>;
    /// A volume of `geometry` was found on it at open: a block device
    /// checks that its layout (its superblock, which nothing
    /// authenticates) is that geometry's; nothing for an object store.
    fn opened<'a>(
        &'a self,
        geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>>;
    /// The objects under the folder `prefix` (`team/`; empty: all) that
    /// `keep` keeps, each with when it was last written, as the store
    /// says; `None` where the store cannot list (a block device, whose
    /// slots are reused rather than left behind). At most `max` listed
    /// (a store cannot make the vault hold or look at what it likes):
    /// [`Found::listed`] at `max` may mean more. Only what `keep` keeps is
    /// held: a sweep keeps its candidates, never every live chunk.
    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing>;
}

/// What [`Objects::list`] keeps of a name listed, given the name and when
/// it was last written.
pub type Keep<'a> = &'a (dyn Fn(&str, std::time::SystemTime) -> bool + Send + Sync);

/// Keeps every name (for tests and tools that want the whole listing).
pub fn keep_all(_: &str, _: std::time::SystemTime) -> bool {
    true
}

/// What [`Objects::list`] gives.
#[derive(Debug, Default)]
pub struct Found {
    /// The names kept, and when each was last written.
    pub names: Vec<(String, std::time::SystemTime)>,
    /// How many were listed, kept or not.
    pub listed: usize,
}

/// What [`Objects::list`] returns.
pub type Listing = Result<Option<Found>, StoreError>;

/// [`Objects`] over an `object_store` store.
#[derive(Clone, Debug)]
pub struct ObjectStoreObjects {
    store: Arc<dyn ObjectStore>,
}

impl ObjectStoreObjects {
    /// Over `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ObjectStoreObjects { store }
    }
}

/// An object's body, refused as soon as more than `max` bytes came: the
/// size the server declared (`Content-Length`) is no bound, a chunked or
/// unframed body can run on regardless of it (a store that streams
/// gigabytes is refused after `max`, not read into memory).
pub(crate) async fn read_at_most(
    mut body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    key: &str,
    max: usize,
) -> Result<Bytes, StoreError> {
    use futures::StreamExt;
    // The first part kept as it came (one part, the usual case: no
    // copy); from the second on, one buffer, never more than `max` (a
    // body in many tiny parts costs no more than one in a few).
    let mut first: Option<Bytes> = None;
    let mut all: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(part) = body.next().await {
        let part = part.map_err(map_err)?;
        len = len.saturating_add(part.len());
        if len > max {
            return Err(StoreError::Other(format!(
                "{key} sent more than the {max} bytes it can be"
            )));
        }
        match first.take() {
            None if all.is_empty() => first = Some(part),
            None => all.extend_from_slice(&part),
            Some(f) => {
                all.reserve_exact(f.len() + part.len());
                all.extend_from_slice(&f);
                all.extend_from_slice(&part);
            }
        }
    }
    Ok(match first {
        Some(f) => f,
        None => Bytes::from(all),
    })
}

fn map_err(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists,
        object_store::Error::Precondition { .. } => StoreError::Precondition,
        object_store::Error::NotImplemented => {
            StoreError::Unsupported("conditional puts are not implemented".into())
        }
        object_store::Error::NotSupported { source } => StoreError::Unsupported(source.to_string()),
        other => StoreError::Other(other.to_string()),
    }
}

impl Objects for ObjectStoreObjects {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move {
            let r = match self.store.get(&Path::from(key)).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(map_err(e)),
            };
            if usize::try_from(r.meta.size).map_or(true, |n| n > max) {
                return Err(StoreError::Other(format!(
                    "{key} is {} bytes, more than the {max} it can be",
                    r.meta.size
                )));
            }
            let tag = Tag {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            let bytes = read_at_most(r.into_stream(), key, max).await?;
            Ok(Some((bytes, tag)))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            let mode = match mode {
                Put::Overwrite => PutMode::Overwrite,
                Put::Create => PutMode::Create,
                Put::Update(t) => PutMode::Update(UpdateVersion {
                    e_tag: t.e_tag,
                    version: t.version,
                }),
            };
            let r = self
                .store
                .put_opts(
                    &Path::from(key),
                    PutPayload::from(data),
                    PutOptions::from(mode),
                )
                .await
                .map_err(map_err)?;
            Ok(Tag {
                e_tag: r.e_tag,
                version: r.version,
            })
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self.store.delete(&Path::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_err(e)),
            }
        })
    }

    fn durable(&self, _names: &mut dyn Iterator<Item = crate::layout::Name>) {}

    fn prepare<'a>(
        &'a self,
        _geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>> {
        Box::pin(async { Ok(()) })
    }

    fn opened<'a>(
        &'a self,
        _geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>> {
        Box::pin(async { Ok(()) })
    }

    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing> {
        Box::pin(async move {
            use futures::StreamExt;
            let folder = prefix.trim_matches('/');
            let at = (!folder.is_empty()).then(|| Path::from(folder));
            let mut stream = self.store.list(at.as_ref());
            let mut out = Found::default();
            // However long the whole takes, a store that stops answering
            // fails the listing.
            while out.listed < max {
                let Some(meta) = tokio::time::timeout(crate::store::LIST_STALL, stream.next())
                    .await
                    .map_err(|_| StoreError::Other(format!("the listing of {prefix:?} stalled")))?
                else {
                    break;
                };
                let meta = meta.map_err(map_err)?;
                out.listed += 1;
                let (name, written) = (
                    meta.location.as_ref(),
                    std::time::SystemTime::from(meta.last_modified),
                );
                if keep(name, written) {
                    out.names.push((name.to_string(), written));
                }
            }
            Ok(Some(out))
        })
    }

    fn exists<'a>(&'a self, key: &'a str, _max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            match self.store.head(&Path::from(key)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(map_err(e)),
            }
        })
    }
}

/// [`Objects`] under a prefix: every name is `prefix` + the name (so
/// that stores with different prefixes take the same names: mirrors).
pub struct Prefixed {
    inner: Arc<dyn Objects>,
    prefix: String,
}

impl Prefixed {
    /// `inner`'s objects under `prefix` (a `/` is added if it has none;
    /// empty: the bucket's root).
    pub fn new(inner: Arc<dyn Objects>, prefix: &str) -> Self {
        let p = prefix.trim_matches('/');
        Prefixed {
            inner,
            prefix: if p.is_empty() {
                String::new()
            } else {
                format!("{p}/")
            },
        }
    }
}

impl Objects for Prefixed {
    fn get<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<(Bytes, Tag)>, StoreError>> {
        Box::pin(async move { self.inner.get(&format!("{}{key}", self.prefix), max).await })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: Put,
    ) -> BoxFuture<'a, Result<Tag, StoreError>> {
        Box::pin(async move {
            self.inner
                .put(&format!("{}{key}", self.prefix), data, mode)
                .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.inner.delete(&format!("{}{key}", self.prefix)).await })
    }

    fn exists<'a>(&'a self, key: &'a str, max: usize) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.inner
                .exists(&format!("{}{key}", self.prefix), max)
                .await
        })
    }
    fn durable(&self, names: &mut dyn Iterator<Item = crate::layout::Name>) {
        self.inner.durable(names);
    }
    fn list<'a>(&'a self, prefix: &'a str, max: usize, keep: Keep<'a>) -> BoxFuture<'a, Listing> {
        Box::pin(async move {
            let ours = |n: &str, t| n.strip_prefix(&self.prefix).is_some_and(|n| keep(n, t));
            let listed = self
                .inner
                .list(&format!("{}{prefix}", self.prefix), max, &ours)
                .await?;
            Ok(listed.map(|mut found| {
                for (n, _) in &mut found.names {
                    n.drain(..self.prefix.len());
                }
                found
            }))
        })
    }
    fn prepare<'a>(
        &'a self,
        geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>> {
        self.inner.prepare(geometry)
    }

    fn opened<'a>(
        &'a self,
        geometry: &'a crate::layout::Geometry,
    ) -> BoxFuture<'a, Result<(), crate::RemoteError>> {
        self.inner.opened(geometry)
    }
}
