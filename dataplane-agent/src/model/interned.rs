//! Strings that millions of records repeat (namespaces, node names), kept
//! once. Every endpoint of a real cluster names its node: a copy each is
//! tens of megabytes at a million endpoints; shared, a pointer each.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
};

/// The strings handed out, and how many there were after the last prune.
struct Table {
    strings: HashSet<Arc<str>>,
    after_prune: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// The shared copy of `value`.
pub(super) fn interned(value: &str) -> Arc<str> {
    // A panic while the table was held left it whole (every operation
    // below completes or does nothing): carry on with it.
    let mut guard = TABLE.lock().unwrap_or_else(PoisonError::into_inner);
    let table = guard.get_or_insert_with(|| Table {
        strings: HashSet::new(),
        after_prune: 0,
    });
    if let Some(existing) = table.strings.get(value) {
        return existing.clone();
    }
    // Names of deleted nodes and namespaces go once nothing else holds
    // them, checked when the table has doubled: the cost stays amortized
    // O(1) per call and the table bounded by what is in use.
    if table.strings.len() >= 2 * table.after_prune.max(64) {
        table.strings.retain(|s| Arc::strong_count(s) > 1);
        table.after_prune = table.strings.len();
    }
    let shared: Arc<str> = Arc::from(value);
    table.strings.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = interned("interned-test-ns");
        let b = interned(&String::from("interned-test-ns"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "interned-test-ns");
    }

    #[test]
    fn strings_nothing_holds_are_dropped_as_the_table_grows() {
        let kept = interned("interned-test-kept");
        for i in 0..10_000 {
            drop(interned(&format!("interned-test-gone-{i}")));
        }
        let size = TABLE
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |t| t.strings.len());
        assert!(size < 5_000, "{size} strings kept");
        assert!(Arc::ptr_eq(&kept, &interned("interned-test-kept")));
    }
}
