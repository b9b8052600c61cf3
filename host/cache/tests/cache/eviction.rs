//! The size budget: LRU eviction that spares pinned and served blobs.

use outpost_cache::{CacheError, FirmwareCache, Sha256};

use crate::support::{MIB, Origin, Site, artifact, manifest, sign};

async fn import(site: &Site, cache: &FirmwareCache, seed: u64) -> Sha256 {
    let file = site.dir.path().join(format!("fw-{seed}.bin"));
    std::fs::write(&file, artifact(MIB, seed)).unwrap();
    cache.import(&file).await.unwrap().sha256
}

async fn site_with_budget(blobs: u64) -> Site {
    let mut site = Site::new().await;
    site.config.max_bytes = blobs * MIB as u64;
    site
}

fn cached(site: &Site) -> usize {
    site.files_in("blobs").len()
}

#[tokio::test]
async fn least_recently_used_goes_first() {
    let site = site_with_budget(3).await;
    let cache = site.cache().await;
    let a = import(&site, &cache, 1).await;
    let b = import(&site, &cache, 2).await;
    let c = import(&site, &cache, 3).await;
    // Touch a: b is now the least recently used.
    drop(cache.get(a).await.unwrap().unwrap());
    let d = import(&site, &cache, 4).await;
    assert!(cache.get(b).await.unwrap().is_none(), "b was evicted");
    for kept in [a, c, d] {
        assert!(cache.get(kept).await.unwrap().is_some());
    }
    assert_eq!(cached(&site), 3);
    assert_eq!(cache.used_bytes(), 3 * MIB as u64);
}

#[tokio::test]
async fn pinned_blobs_are_never_evicted() {
    let site = site_with_budget(2).await;
    let cache = site.cache().await;
    let a = import(&site, &cache, 1).await;
    let b = import(&site, &cache, 2).await;
    cache.pin(a, "deployment:17").await.unwrap();
    cache.pin(b, "deployment:18").await.unwrap();
    let file = site.dir.path().join("c.bin");
    std::fs::write(&file, artifact(MIB, 3)).unwrap();
    let error = cache.import(&file).await.unwrap_err();
    assert!(
        matches!(error, CacheError::Full { needed, unevictable, .. } if needed == MIB as u64 && unevictable == 2 * MIB as u64),
        "{error}"
    );
    assert!(error.to_string().contains("firmware cache is full"));
    assert_eq!(cached(&site), 2, "nothing was lost");
    assert!(site.files_in("tmp").is_empty());

    // Removing a pinned blob is refused with the holders named.
    let error = cache.remove(a).await.unwrap_err();
    assert!(error.to_string().contains("deployment:17"), "{error}");
    let info = cache.info(a).await.unwrap().unwrap();
    assert_eq!(info.pins, vec!["deployment:17".to_owned()]);

    // Unpinning b lets it go.
    cache.unpin(b, "deployment:18").await.unwrap();
    let c = cache.import(&file).await.unwrap().sha256;
    assert!(cache.get(b).await.unwrap().is_none());
    assert!(cache.get(a).await.unwrap().is_some());
    assert!(cache.get(c).await.unwrap().is_some());
}

#[tokio::test]
async fn a_blob_being_served_is_not_evicted() {
    let site = site_with_budget(2).await;
    let cache = site.cache().await;
    let a = import(&site, &cache, 1).await;
    let b = import(&site, &cache, 2).await;
    // a is older, but a device is downloading it.
    let serving = cache.get(a).await.unwrap().unwrap();
    drop(cache.get(b).await.unwrap().unwrap());
    let _c = import(&site, &cache, 3).await;
    assert!(
        cache.get(b).await.unwrap().is_none(),
        "b went instead of the served a"
    );
    assert_eq!(serving.read_all().unwrap(), artifact(MIB, 1));
    drop(serving);
}

#[tokio::test]
async fn a_download_that_cannot_fit_is_refused_before_fetching() {
    let origin = Origin::start().await;
    let site = site_with_budget(1).await;
    let cache = site.cache().await;
    let a = import(&site, &cache, 1).await;
    cache.pin(a, "deployment:1").await.unwrap();
    let bytes = artifact(MIB, 9);
    let url = origin.publish("fw.bin", bytes.clone());
    cache
        .add_manifest(&sign(&manifest("1", &[("fw.bin", &bytes, Some(&url))])))
        .await
        .unwrap();
    let error = cache.ensure(Sha256::digest(&bytes)).await.unwrap_err();
    assert!(matches!(error, CacheError::Full { .. }), "{error}");
    assert_eq!(origin.requests(), 0);
    // Unpinned, the old blob makes way.
    cache.unpin(a, "deployment:1").await.unwrap();
    assert_eq!(
        cache
            .ensure(Sha256::digest(&bytes))
            .await
            .unwrap()
            .read_all()
            .unwrap(),
        bytes
    );
    assert!(cache.get(a).await.unwrap().is_none());
}

#[tokio::test]
async fn operator_remove_and_reimport() {
    let site = site_with_budget(4).await;
    let cache = site.cache().await;
    let a = import(&site, &cache, 1).await;
    // Importing the same file again is harmless.
    assert_eq!(import(&site, &cache, 1).await, a);
    assert_eq!(cached(&site), 1);
    cache.remove(a).await.unwrap();
    assert!(matches!(
        cache.remove(a).await,
        Err(CacheError::NotCached(_))
    ));
    assert_eq!(cached(&site), 0);
    assert!(cache.list().await.unwrap().is_empty());
}
