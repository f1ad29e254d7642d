//! Where images go: any object_store backend named by the job's output URL — `s3://` (credentials,
//! region and endpoint from the standard `AWS_*` variables), `gs://`, `az://`, `file://` or a plain path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("upload to {key}: {source}")]
    Upload { key: String, source: object_store::Error },
}

impl OutputError {
    /// A bad URL will never work; an upload error may pass on retry.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Url { .. })
    }
}

/// One output location: a store plus the prefix inside it.
#[derive(Clone)]
pub struct OutputLocation {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Public form of the location, used to build each object's URL.
    base_url: String,
}

impl OutputLocation {
    pub fn open(url: &str) -> Result<Self, OutputError> {
        let err = |m: String| OutputError::Url { url: url.to_string(), message: m };
        fresco_core::validate_output_url(url).map_err(|e| err(e.message))?;
        let (store, prefix, base_url): (Arc<dyn ObjectStore>, String, String) = match url.split_once("://") {
            None | Some(("file", _)) => {
                let path = match url.strip_prefix("file://") {
                    Some(p) => std::path::PathBuf::from(p),
                    None => std::path::PathBuf::from(url),
                };
                std::fs::create_dir_all(&path).map_err(|e| err(format!("cannot create {}: {e}", path.display())))?;
                let abs = path.canonicalize().map_err(|e| err(e.to_string()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&abs).map_err(|e| err(e.to_string()))?;
                (Arc::new(store), String::new(), format!("file://{}", abs.display()))
            }
            Some((scheme, _)) => {
                let parsed = Url::parse(url).map_err(|e| err(e.to_string()))?;
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" => Arc::new(object_store::aws::AmazonS3Builder::from_env().with_url(url).build().map_err(|e| err(e.to_string()))?),
                    "gs" => Arc::new(
                        object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url).build().map_err(|e| err(e.to_string()))?,
                    ),
                    _ => Arc::new(
                        object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url).build().map_err(|e| err(e.to_string()))?,
                    ),
                };
                let prefix = parsed.path().trim_matches('/').to_string();
                (store, prefix, url.trim_end_matches('/').to_string())
            }
        };
        Ok(Self { store, prefix, base_url })
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.base_url)
    }

    /// Writes one object; returns once the store acknowledged it (puts are atomic in every backend).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), OutputError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|source| OutputError::Upload { key: key.to_string(), source })
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, OutputError> {
        let r = self.store.get(&self.path(key)).await.map_err(|source| OutputError::Upload { key: key.to_string(), source })?;
        r.bytes().await.map_err(|source| OutputError::Upload { key: key.to_string(), source })
    }
}

/// Output locations by URL, opened once each.
#[derive(Default)]
pub struct Outputs {
    open: Mutex<HashMap<String, OutputLocation>>,
}

impl Outputs {
    pub fn get(&self, url: &str) -> Result<OutputLocation, OutputError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = open.get(url) {
            return Ok(l.clone());
        }
        let l = OutputLocation::open(url)?;
        open.insert(url.to_string(), l.clone());
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_paths_and_file_urls_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let plain = OutputLocation::open(dir.path().join("a").to_str().unwrap()).unwrap();
        plain.put("job/00000001.png", Bytes::from_static(b"png")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/job/00000001.png")).unwrap(), b"png");
        let url = format!("file://{}", dir.path().join("b").display());
        let file = OutputLocation::open(&url).unwrap();
        file.put("k.json", Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(file.get("k.json").await.unwrap(), Bytes::from_static(b"{}"));
        assert!(file.url_of("k.json").ends_with("/b/k.json"));
        assert!(OutputLocation::open("ftp://x/y").err().is_some_and(|e| e.is_permanent()));
    }
}
