//! Work in flight, shared between request tasks: a table whose entries each live exactly as
//! long as a [`Claim`], so however the owning call ends (an error, a panic, a client that went
//! away) its entry goes with it. The images service keeps the names with an operation in
//! progress in one; the VM service its running `vm exec` sessions and the VMs that are starting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Entries by key, each held by one [`Claim`]. Cheap to clone (clones share the table).
pub struct Registry<V>(Arc<Mutex<HashMap<String, V>>>);

impl<V> Clone for Registry<V> {
    fn clone(&self) -> Self {
        Registry(self.0.clone())
    }
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Registry(Arc::default())
    }
}

/// A registry entry, removed when this is dropped.
#[must_use = "the entry is removed as soon as its claim is dropped"]
pub struct Claim<V> {
    table: Registry<V>,
    key: String,
}

impl<V> Registry<V> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, V>> {
        // Entries are plain data; one left by a task that panicked is still right to read.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters `value` under `key`, unless the key is held already (then `None`).
    pub fn claim(&self, key: &str, value: V) -> Option<Claim<V>> {
        let mut table = self.lock();
        if table.contains_key(key) {
            return None;
        }
        table.insert(key.to_owned(), value);
        Some(Claim {
            table: self.clone(),
            key: key.to_owned(),
        })
    }

    /// A copy of the value held under `key`.
    pub fn get(&self, key: &str) -> Option<V>
    where
        V: Clone,
    {
        self.lock().get(key).cloned()
    }

    /// Whether any held key satisfies `pred`.
    pub fn any_key(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.lock().keys().any(|k| pred(k))
    }
}

impl<V> Drop for Claim<V> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_once_and_freed_with_its_claim() {
        let r: Registry<u32> = Registry::default();
        let claim = r.claim("web", 1).unwrap();
        assert!(r.claim("web", 2).is_none(), "held twice");
        assert_eq!(r.get("web"), Some(1));
        assert!(r.any_key(|k| k == "web"));
        drop(claim);
        assert_eq!(r.get("web"), None);
        assert!(r.claim("web", 3).is_some());
    }

    #[test]
    fn a_panicking_holder_still_frees_its_key() {
        let r: Registry<()> = Registry::default();
        let r2 = r.clone();
        let _ = std::thread::spawn(move || {
            let _claim = r2.claim("x", ()).unwrap();
            panic!("the operation failed badly");
        })
        .join();
        assert!(r.claim("x", ()).is_some());
    }
}
