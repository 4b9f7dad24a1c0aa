//! Source choice for an Import: the order in which its sources are tried, by `lbScheme`
//! (`static`: as listed; `round-robin`: rotated by a per-Import counter; `random`: shuffled),
//! then every source whose peer is reachable (by heartbeat) ahead of the others.

use std::{collections::HashMap, sync::Mutex};

use crate::{
    api::{Import, ImportSource, LbScheme, ObjectKey},
    peer::Peers,
};

/// The round-robin turn of each Import.
#[derive(Default)]
pub struct Balancer {
    turns: Mutex<HashMap<ObjectKey, usize>>,
}

impl Balancer {
    /// The Import's sources in the order to try them.
    pub fn order<'a>(
        &self,
        key: &ObjectKey,
        import: &'a Import,
        peers: &Peers,
    ) -> Vec<&'a ImportSource> {
        let mut sources: Vec<&ImportSource> = import.spec.sources.iter().collect();
        match import.spec.lb_scheme {
            LbScheme::Static => {}
            LbScheme::RoundRobin => {
                let start = self.next_turn(key) % sources.len().max(1);
                sources.rotate_left(start);
            }
            LbScheme::Random => fastrand::shuffle(&mut sources),
        }
        let (mut first, rest): (Vec<_>, Vec<_>) =
            sources.into_iter().partition(|s| peers.reachable(&s.peer));
        first.extend(rest);
        first
    }

    /// Forgets a deleted Import's turn.
    pub fn forget(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }

    fn next_turn(&self, key: &ObjectKey) -> usize {
        let mut turns = self.lock();
        // Look up before inserting: the key is cloned once per Import, not per connection.
        match turns.get_mut(key) {
            Some(next) => {
                *next = next.wrapping_add(1);
                *next - 1
            }
            None => {
                turns.insert(key.clone(), 1);
                0
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, usize>> {
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }
}
