//! Per-image reader/writer locks shared by the images and VM services. Making a VM from an
//! image (reading its row and runtime settings, cloning its root file system) holds the image
//! for reading; replacing an image's files with a newer pull, or deleting them, holds it for
//! writing. So a clone never finds its source gone, and a VM never gets one pull's disk with
//! another pull's settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

#[derive(Clone, Default)]
pub struct ImageLocks(Arc<Mutex<HashMap<String, Arc<RwLock<()>>>>>);

impl ImageLocks {
    fn lock_for(&self, image: &str) -> Arc<RwLock<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(image.to_owned()).or_default().clone()
    }

    /// Holds `image` for reading (many readers at once).
    pub async fn read(&self, image: &str) -> OwnedRwLockReadGuard<()> {
        self.lock_for(image).read_owned().await
    }

    /// Holds `image` for writing: waits until no reader holds it.
    pub async fn write(&self, image: &str) -> OwnedRwLockWriteGuard<()> {
        self.lock_for(image).write_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_writer_waits_for_readers_of_the_same_image_only() {
        let locks = ImageLocks::default();
        let reader = locks.read("a").await;
        let _other = locks.write("b").await;
        let l2 = locks.clone();
        let writer = tokio::spawn(async move { l2.write("a").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the writer must wait for the reader");
        drop(reader);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
    }
}
