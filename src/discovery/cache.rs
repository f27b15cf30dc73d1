//! Discovery results kept for a while, positive and negative: a lookup for
//! a cached address does no network I/O.

use super::Discovered;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Cache {
    positive_ttl: Duration,
    negative_ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Discovered)>>,
}

impl Cache {
    pub fn new(positive_ttl: Duration, negative_ttl: Duration) -> Cache {
        Cache {
            positive_ttl,
            negative_ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &str) -> Option<Discovered> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((expires, value)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: String, value: Discovered, positive: bool) {
        let ttl = if positive {
            self.positive_ttl
        } else {
            self.negative_ttl
        };
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, (Instant::now() + ttl, value));
    }

    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
