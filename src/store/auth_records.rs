//! Identity records in the `auth` column family: `kind \0 id → JSON`. The store keeps them
//! durable and knows nothing of what they mean; `auth::keys` owns their types and checks.
//! Every write is synced: a user, key or revocation the operator was told about survives a crash.

use super::index::{CF_AUTH, key, prefix};
use super::{Store, StoreError};

impl Store {
    /// Every record of one kind, as `(id, value)`, in id order.
    pub fn auth_records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let p = prefix(&[kind]);
        let mut out = Vec::new();
        self.index.scan(CF_AUTH, &p, None, |k, v| {
            out.push((
                String::from_utf8_lossy(&k[p.len()..]).into_owned(),
                v.to_vec(),
            ));
            true
        })?;
        Ok(out)
    }

    pub fn put_auth_record(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut batch = self.index.batch();
        batch.put(CF_AUTH, &key(&[kind, id]), value);
        Ok(self.index.write_synced(batch)?)
    }

    /// Removes a record; false if there was none.
    pub fn delete_auth_record(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        let k = key(&[kind, id]);
        if !self.index.exists(CF_AUTH, &k)? {
            return Ok(false);
        }
        let mut batch = self.index.batch();
        batch.delete(CF_AUTH, &k);
        self.index.write_synced(batch)?;
        Ok(true)
    }
}
