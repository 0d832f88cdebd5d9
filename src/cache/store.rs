//! [`Store`]: where cached answers live — a `pingora-cache` [`Storage`] in memory, made for
//! production rather than tests: entries in 64 shards (a hit takes one shard's read lock and
//! clones a reference-counted body, copying nothing), an answer admitted only once its body
//! is complete, and each admitted entry's size (key, head and body) reported to the eviction
//! manager, which keeps the total under `cache.max_size` by evicting the least valuable
//! entries (the proxy purges what it names from here).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use pingora_cache::eviction::{CacheEntryKeyRef, EvictionManager};
use pingora_cache::key::{CacheHashKey, CompactCacheKey};
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, PurgeType, Storage};
use pingora_error::{Error, ErrorType, Result};

const SHARDS: usize = 64;
/// What an entry costs besides its head and body (key, map slot, bookkeeping).
const ENTRY_OVERHEAD: usize = 256;

struct Entry {
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
    /// For purges by host and path: the key's compact form and what it was made from.
    compact: CompactCacheKey,
    primary: Vec<u8>,
}

pub struct Store {
    shards: Vec<RwLock<HashMap<String, Entry>>>,
    /// The entries of each primary key (its variants), for invalidating a URI at once.
    variants: RwLock<HashMap<Vec<u8>, Vec<String>>>,
    entries: AtomicU64,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Store {
        Store {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            variants: RwLock::new(HashMap::new()),
            entries: AtomicU64::new(0),
        }
    }

    fn shard(&self, hash: &str) -> &RwLock<HashMap<String, Entry>> {
        let n = hash
            .bytes()
            .take(4)
            .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
        &self.shards[n % SHARDS]
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.entries.load(Relaxed)
    }

    /// Removes every entry whose primary key `matches` (all its variants), telling the
    /// eviction manager; returns how many went.
    pub fn purge_where(
        &self,
        eviction: &dyn EvictionManager,
        matches: impl Fn(&[u8]) -> bool,
    ) -> usize {
        let mut purged = Vec::new();
        for shard in &self.shards {
            let mut map = shard.write();
            map.retain(|hash, e| {
                if matches(&e.primary) {
                    eviction.remove(CacheEntryKeyRef::KeyOnly(&e.compact));
                    purged.push((e.primary.clone(), hash.clone()));
                    false
                } else {
                    true
                }
            });
        }
        self.entries.fetch_sub(purged.len() as u64, Relaxed);
        for (primary, hash) in &purged {
            self.unindex(primary, hash);
        }
        purged.len()
    }

    /// Removes every variant stored under `primary` (one URI), telling the eviction
    /// manager; returns how many went. Costs the variants, not the store's size.
    pub fn purge_primary(&self, eviction: &dyn EvictionManager, primary: &[u8]) -> usize {
        let hashes = self.variants.write().remove(primary).unwrap_or_default();
        let mut purged = 0;
        for hash in hashes {
            let entry = self.shard(&hash).write().remove(&hash);
            if let Some(e) = entry {
                eviction.remove(CacheEntryKeyRef::KeyOnly(&e.compact));
                self.entries.fetch_sub(1, Relaxed);
                purged += 1;
            }
        }
        purged
    }

    fn remove(&self, hash: &str) -> bool {
        let removed = self.shard(hash).write().remove(hash);
        match removed {
            Some(e) => {
                self.entries.fetch_sub(1, Relaxed);
                self.unindex(&e.primary, hash);
                true
            }
            None => false,
        }
    }

    fn index(&self, primary: &[u8], hash: &str) {
        let mut variants = self.variants.write();
        let list = variants.entry(primary.to_vec()).or_default();
        if !list.iter().any(|h| h == hash) {
            list.push(hash.to_string());
        }
    }

    fn unindex(&self, primary: &[u8], hash: &str) {
        let mut variants = self.variants.write();
        if let Some(list) = variants.get_mut(primary) {
            list.retain(|h| h != hash);
            if list.is_empty() {
                variants.remove(primary);
            }
        }
    }
}

/// A hit: the stored body, or a range of it.
struct Hit {
    body: Bytes,
    range: (usize, usize),
    done: bool,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.range.0..self.range.1)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.body.len() {
            return Error::e_explain(ErrorType::InternalError, "seek past the end of the body");
        }
        self.range = (
            start,
            end.map_or(self.body.len(), |e| e.min(self.body.len())),
        );
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len() + ENTRY_OVERHEAD
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A fill in progress: the body is gathered, and the entry admitted only when complete.
struct Fill {
    store: &'static Store,
    hash: String,
    meta: (Vec<u8>, Vec<u8>),
    compact: CompactCacheKey,
    primary: Vec<u8>,
    body: BytesMut,
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let size = self.body.len() + self.meta.0.len() + self.meta.1.len() + ENTRY_OVERHEAD;
        self.store.index(&self.primary, &self.hash);
        let entry = Entry {
            meta: self.meta,
            body: self.body.freeze(),
            compact: self.compact,
            primary: self.primary,
        };
        let replaced = self
            .store
            .shard(&self.hash)
            .write()
            .insert(self.hash.clone(), entry)
            .is_some();
        if !replaced {
            self.store.entries.fetch_add(1, Relaxed);
        }
        Ok(MissFinishType::Created(size))
    }
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let hash = key.combined();
        let found = {
            let map = self.shard(&hash).read();
            map.get(&hash).map(|e| (e.meta.clone(), e.body.clone()))
        };
        let Some((meta, body)) = found else {
            return Ok(None);
        };
        let meta = CacheMeta::deserialize(&meta.0, &meta.1)?;
        let range = (0, body.len());
        Ok(Some((
            meta,
            Box::new(Hit {
                body,
                range,
                done: false,
            }),
        )))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        Ok(Box::new(Fill {
            store: self,
            hash: key.combined(),
            meta: meta.serialize()?,
            compact: key.to_compact(),
            primary: key.primary_key().to_vec(),
            body: BytesMut::new(),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let hash = target.key().combined();
        Ok(if self.remove(&hash) {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let hash = key.combined();
        let meta = meta.serialize()?;
        let mut map = self.shard(&hash).write();
        Ok(match map.get_mut(&hash) {
            Some(e) => {
                e.meta = meta;
                true
            }
            None => false,
        })
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}
