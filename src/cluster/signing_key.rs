//! The token signing key, shared by every replica so a token issued by one verifies on all. The
//! first replica to need it stores a fresh PKCS#8 P-256 key; every other one (including those
//! racing it) reads that same key back: `INSERT ... ON CONFLICT DO NOTHING` then a read.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::pg::{Db, PgError};

impl Db {
    /// The cluster's token signing key (PKCS#8 DER), created on first use.
    pub async fn token_signing_key(&self) -> Result<Vec<u8>, PgError> {
        let client = self.client().await?;
        if let Some(row) = client
            .query_opt("SELECT pkcs8 FROM token_signing_key WHERE id = 1", &[])
            .await?
        {
            return Ok(row.get(0));
        }
        let fresh =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| PgError::Corrupt("cannot generate a P-256 key".into()))?;
        let won = client
            .execute(
                "INSERT INTO token_signing_key (id, pkcs8) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&fresh.as_ref()],
            )
            .await?;
        if won == 1 {
            tracing::info!("generated the cluster's token signing key");
        }
        Ok(client
            .query_one("SELECT pkcs8 FROM token_signing_key WHERE id = 1", &[])
            .await?
            .get(0))
    }
}
