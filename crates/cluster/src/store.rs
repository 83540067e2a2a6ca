//! [`SnapshotStore`]: one interface over the places snapshot objects live: a local folder (the single-node
//! default), memory (tests), and S3-compatible storage through the `object_store` crate.
//!
//! Objects are immutable: [`put_new`](SnapshotStore::put_new) creates a name or fails, on S3 with a conditional
//! `PUT` (`If-None-Match: *`), so two writers can never both believe they wrote the same name. Which object is
//! a session's current one is decided elsewhere: on a single node, the latest name
//! ([`latest`](SnapshotStore::latest)); in a cluster, the pointer that etcd holds.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::local::LocalDir;
use crate::name::{ObjectName, valid_session};

/// What a store operation could not do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's address cannot be used.
    #[error("invalid snapshot store `{url}`: {reason}")]
    BadUrl {
        /// The address given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A session id that is not 1–128 letters, digits, `-` or `_`.
    #[error("session id `{0}` is not valid: use 1–128 ASCII letters, digits, `-` or `_`")]
    BadSession(String),
    /// [`SnapshotStore::put_new`] of a name that exists: objects are never replaced.
    #[error("snapshot {name} already exists in {store}")]
    Exists {
        /// The object's name.
        name: String,
        /// The store's address.
        store: String,
    },
    /// No object of that name.
    #[error("no snapshot {name} in {store}")]
    NotFound {
        /// The object's name.
        name: String,
        /// The store's address.
        store: String,
    },
    /// The local folder failed, or the snapshot writer did.
    #[error("{op} {name} in {store}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The object or session concerned.
        name: String,
        /// The store's address.
        store: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The object store (S3, memory) failed.
    #[error("{op} {name} in {store}: {source}")]
    Object {
        /// What was being done.
        op: &'static str,
        /// The object or session concerned.
        name: String,
        /// The store's address.
        store: String,
        /// The underlying error.
        #[source]
        source: Box<object_store::Error>,
    },
}

/// A fetched snapshot: a file to stream from, or the bytes of a downloaded object.
#[derive(Debug)]
pub enum Fetched {
    /// The object is this file (the local folder): restore streams its pages straight into memory.
    File(PathBuf),
    /// The object's bytes, downloaded.
    Bytes(Vec<u8>),
}

#[derive(Debug)]
enum Backend {
    Local(LocalDir),
    Object(Arc<dyn ObjectStore>),
}

/// Where snapshot objects `{session}/{fence}-{seq}.actor` are kept. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    backend: Arc<Backend>,
    url: String,
}

fn bad_url(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::BadUrl { url: url.to_string(), reason: reason.into() }
}

impl SnapshotStore {
    /// Opens the store at `url`:
    ///
    /// - a path, or `file://` followed by an absolute path: a local folder (created if needed);
    /// - `memory://`: a store in this process's memory, empty at first (for tests);
    /// - `s3://BUCKET` or `s3://BUCKET/PREFIX`: S3 or an S3-compatible server. Endpoint, region and credentials
    ///   come from the usual environment variables (`AWS_ENDPOINT`, `AWS_REGION` or `AWS_DEFAULT_REGION`,
    ///   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `AWS_ALLOW_HTTP=true` for a
    ///   plain-HTTP endpoint). The server must honour conditional `PUT`s (`If-None-Match`).
    ///
    /// # Errors
    ///
    /// [`StoreError::BadUrl`] for another scheme, an empty bucket or a relative `file://` path, or S3 settings
    /// the client refuses; [`StoreError::Io`] when a local folder cannot be created or read.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &[])
    }

    /// [`open`](Self::open) with S3 settings given here rather than by the environment (they take precedence
    /// over it): `object_store`'s keys, such as `aws_endpoint`, `aws_region`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_allow_http`. Ignored for other stores.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open), and [`StoreError::BadUrl`] naming an unknown key.
    pub fn open_with(url: &str, s3_options: &[(&str, &str)]) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad_url(url, "no bucket: use s3://BUCKET or s3://BUCKET/PREFIX"));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                // Objects are created only if absent (If-None-Match: *).
                .with_conditional_put(S3ConditionalPut::ETagMatch);
            for (key, value) in s3_options {
                let key: AmazonS3ConfigKey =
                    key.parse().map_err(|e| bad_url(url, format!("unknown S3 setting `{key}`: {e}")))?;
                builder = builder.with_config(key, *value);
            }
            let s3 = builder.build().map_err(|e| bad_url(url, e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            let store: Arc<dyn ObjectStore> =
                if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
            return Ok(SnapshotStore { backend: Arc::new(Backend::Object(store)), url: url.to_string() });
        }
        if url == "memory://" {
            return Ok(Self::memory());
        }
        let dir = match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') => PathBuf::from(path),
            Some(_) => return Err(bad_url(url, "a file:// address needs an absolute path (file:///var/lib/…)")),
            None if url.contains("://") => {
                return Err(bad_url(url, "use a folder, file:///PATH, s3://BUCKET[/PREFIX] or memory://"));
            }
            None => PathBuf::from(url),
        };
        Self::local(dir)
    }

    /// A local folder (created if needed): temporary files a killed writer left are removed, and snapshots of
    /// the earlier one-file-per-session layout (`{session}.actor`) become `{session}/0-1.actor`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the folder cannot be created, read or tidied.
    pub fn local(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let url = dir.display().to_string();
        let local = LocalDir::open(dir).map_err(|source| StoreError::Io {
            op: "opening",
            name: "the folder".into(),
            store: url.clone(),
            source,
        })?;
        Ok(SnapshotStore { backend: Arc::new(Backend::Local(local)), url })
    }

    /// An empty store in this process's memory.
    pub fn memory() -> Self {
        SnapshotStore { backend: Arc::new(Backend::Object(Arc::new(InMemory::new()))), url: "memory://".into() }
    }

    /// The store's address, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The folder of a local store.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        match &*self.backend {
            Backend::Local(dir) => Some(dir.root()),
            Backend::Object(_) => None,
        }
    }

    fn io(&self, op: &'static str, name: impl ToString, source: io::Error) -> StoreError {
        StoreError::Io { op, name: name.to_string(), store: self.url.clone(), source }
    }

    fn object(&self, op: &'static str, name: impl ToString, source: object_store::Error) -> StoreError {
        match source {
            object_store::Error::AlreadyExists { .. } => {
                StoreError::Exists { name: name.to_string(), store: self.url.clone() }
            }
            object_store::Error::NotFound { .. } => {
                StoreError::NotFound { name: name.to_string(), store: self.url.clone() }
            }
            source => {
                StoreError::Object { op, name: name.to_string(), store: self.url.clone(), source: Box::new(source) }
            }
        }
    }

    /// Creates object `name` with the bytes `write` writes. Returns the bytes written. The object exists (whole
    /// and, for a local folder, durable) only once this returns `Ok`.
    ///
    /// Call it from a blocking thread or a [`tokio::runtime::Handle::block_on`]: a local folder is written with
    /// blocking file calls.
    ///
    /// # Errors
    ///
    /// [`StoreError::Exists`] when the name exists (nothing is changed); [`StoreError::Io`] when `write` or the
    /// folder fails; [`StoreError::Object`] when the upload fails.
    pub async fn put_new(
        &self,
        name: &ObjectName,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<u64, StoreError> {
        match &*self.backend {
            Backend::Local(dir) => match dir.put_new(name, write) {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err(StoreError::Exists { name: name.path(), store: self.url.clone() }),
                Err(e) => Err(self.io("writing", name, e)),
            },
            Backend::Object(store) => {
                let mut bytes = Vec::new();
                write(&mut bytes).map_err(|e| self.io("writing", name, e))?;
                let len = bytes.len() as u64;
                let options = PutOptions::from(PutMode::Create);
                store
                    .put_opts(&ObjectPath::from(name.path()), PutPayload::from(bytes), options)
                    .await
                    .map_err(|e| self.object("uploading", name, e))?;
                Ok(len)
            }
        }
    }

    /// Fetches object `name`.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] when there is no such object; [`StoreError::Object`] when the download fails.
    pub async fn get(&self, name: &ObjectName) -> Result<Fetched, StoreError> {
        match &*self.backend {
            Backend::Local(dir) => dir
                .get(name)
                .map(Fetched::File)
                .ok_or_else(|| StoreError::NotFound { name: name.path(), store: self.url.clone() }),
            Backend::Object(store) => {
                let path = ObjectPath::from(name.path());
                let got = store.get(&path).await.map_err(|e| self.object("downloading", name, e))?;
                let bytes = got.bytes().await.map_err(|e| self.object("downloading", name, e))?;
                Ok(Fetched::Bytes(bytes.into()))
            }
        }
    }

    /// Objects of `session`, oldest first (by fence, then seq).
    ///
    /// # Errors
    ///
    /// [`StoreError::BadSession`] for an invalid id; [`StoreError::Io`] or [`StoreError::Object`] when listing
    /// fails.
    pub async fn list(&self, session: &str) -> Result<Vec<ObjectName>, StoreError> {
        if !valid_session(session) {
            return Err(StoreError::BadSession(session.to_string()));
        }
        let mut names = match &*self.backend {
            Backend::Local(dir) => dir.list(session).map_err(|e| self.io("listing", session, e))?,
            Backend::Object(store) => {
                let prefix = ObjectPath::from(session);
                let listed =
                    store.list_with_delimiter(Some(&prefix)).await.map_err(|e| self.object("listing", session, e))?;
                listed
                    .objects
                    .iter()
                    .filter_map(|meta| ObjectName::parse_file(session, meta.location.filename()?))
                    .collect()
            }
        };
        names.sort_by_key(ObjectName::order);
        Ok(names)
    }

    /// The newest object of `session`, if it has any.
    ///
    /// # Errors
    ///
    /// As for [`list`](Self::list).
    pub async fn latest(&self, session: &str) -> Result<Option<ObjectName>, StoreError> {
        Ok(self.list(session).await?.pop())
    }

    /// Every session that has objects, sorted.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] or [`StoreError::Object`] when listing fails.
    pub async fn sessions(&self) -> Result<Vec<String>, StoreError> {
        let mut sessions = match &*self.backend {
            Backend::Local(dir) => {
                let mut with_objects = vec![];
                for session in dir.sessions().map_err(|e| self.io("listing", "sessions", e))? {
                    if !dir.list(&session).map_err(|e| self.io("listing", &session, e))?.is_empty() {
                        with_objects.push(session);
                    }
                }
                with_objects
            }
            Backend::Object(store) => {
                // Every object, not the "folders": a store may keep listing a prefix whose objects are gone.
                let mut objects = store.list(None);
                let mut sessions = std::collections::BTreeSet::new();
                while let Some(meta) = objects.next().await {
                    let meta = meta.map_err(|e| self.object("listing", "sessions", e))?;
                    if let Some(name) = ObjectName::parse(meta.location.as_ref()) {
                        sessions.insert(name.session);
                    }
                }
                sessions.into_iter().collect()
            }
        };
        sessions.sort();
        Ok(sessions)
    }

    /// Deletes object `name`; an absent object is not an error.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] or [`StoreError::Object`] when the deletion fails.
    pub async fn delete(&self, name: &ObjectName) -> Result<(), StoreError> {
        match &*self.backend {
            Backend::Local(dir) => dir.delete(name).map_err(|e| self.io("deleting", name, e)),
            Backend::Object(store) => match store.delete(&ObjectPath::from(name.path())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.object("deleting", name, e)),
            },
        }
    }

    /// Garbage collection after `keep` was committed: deletes the objects of its session that come before it
    /// (earlier claims, earlier snapshots of its claim). Objects after it are left alone: they can only be of a
    /// later claim, whose owner collects them. Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// As for [`list`](Self::list) and [`delete`](Self::delete); objects deleted before the failure stay deleted.
    pub async fn collect(&self, keep: &ObjectName) -> Result<usize, StoreError> {
        let mut deleted = 0;
        for name in self.list(&keep.session).await? {
            if name.order() < keep.order() {
                self.delete(&name).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes every object of `session`.
    ///
    /// # Errors
    ///
    /// As for [`list`](Self::list) and [`delete`](Self::delete).
    pub async fn remove_session(&self, session: &str) -> Result<(), StoreError> {
        if let Backend::Local(dir) = &*self.backend {
            if !valid_session(session) {
                return Err(StoreError::BadSession(session.to_string()));
            }
            return dir.remove_session(session).map_err(|e| self.io("deleting", session, e));
        }
        for name in self.list(session).await? {
            self.delete(&name).await?;
        }
        Ok(())
    }
}

/// Objects of a store listed flat (every session), for tools and tests.
///
/// # Errors
///
/// As for [`SnapshotStore::sessions`] and [`SnapshotStore::list`].
pub async fn all_objects(store: &SnapshotStore) -> Result<Vec<ObjectName>, StoreError> {
    let mut all = vec![];
    for session in store.sessions().await? {
        all.extend(store.list(&session).await?);
    }
    Ok(all)
}
