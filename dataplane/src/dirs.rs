//! Directories under parents that strait shares between labs and agents (`strait/` in the
//! cgroup tree, `/sys/fs/bpf/strait`, `/run/strait/labs`). Whoever removes the last child also
//! removes the empty parent, so a creation can race with that removal.

use std::{io, path::Path};

/// `create_dir_all` that tolerates a concurrent cleanup: if a parent it just made is removed
/// (it was empty for a moment) before the child is made, it starts again.
pub fn create_dir_all_shared(path: &Path) -> io::Result<()> {
    // Each attempt is two or three mkdir calls; a cleanup empties a parent only briefly.
    const ATTEMPTS: usize = 1000;
    let mut attempt = 1;
    loop {
        match std::fs::create_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::create_dir_all_shared;

    #[test]
    fn a_parent_removed_whenever_it_is_empty_does_not_fail_the_creation() {
        // Harsher than labs coming and going: another thread removes the shared parent every
        // time it is empty, so most plain create_dir_all calls would lose the race.
        let root = std::env::temp_dir().join(format!("strait-dirs-{}", std::process::id()));
        let parent = root.join("shared");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let remover = {
            let (parent, stop) = (parent.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_dir(&parent);
                }
            })
        };
        for round in 0..300 {
            let own = parent.join(format!("lab-{round}"));
            create_dir_all_shared(&own).expect("created despite the remover");
            assert!(own.is_dir());
            std::fs::remove_dir(&own).expect("removing its own directory");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        remover.join().expect("remover thread");
        let _ = std::fs::remove_dir_all(&root);
    }
}
