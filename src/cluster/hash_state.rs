//! A running hash as bytes, so an upload hashed partly on one replica is continued on another.
//! S3 offers no way to read the parts of an unfinished multipart upload, so re-hashing what was
//! uploaded is impossible: the hash state itself is persisted. sha2 0.11 exposes it
//! (`SerializableState`: the compression state, the length so far and the partial block); it is
//! stored behind a format byte naming that encoding, and sha2 promises it stable within 0.11.
//! A state this binary cannot decode is refused, never guessed at.

use sha2::digest::common::hazmat::SerializableState;

use crate::oci::{Algorithm, Digester};

/// Format byte of sha2 0.11's serialised state. A future encoding gets another byte (and this
/// one keeps its decoder while sessions written with it may still exist).
const SHA2_0_11: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("the stored hash state is not a {0} state this binary can decode")]
pub struct HashStateError(&'static str);

/// The hash's state, as stored.
pub fn save(digester: &Digester) -> Vec<u8> {
    let mut out = vec![SHA2_0_11];
    match digester {
        Digester::Sha256(h) => out.extend_from_slice(h.serialize().as_slice()),
        Digester::Sha512(h) => out.extend_from_slice(h.serialize().as_slice()),
    }
    out
}

/// The hash `save` stored, continued as if it had never stopped.
pub fn load(algorithm: Algorithm, stored: &[u8]) -> Result<Digester, HashStateError> {
    let refused = HashStateError(algorithm.as_str());
    let Some((&SHA2_0_11, state)) = stored.split_first() else {
        return Err(refused);
    };
    match algorithm {
        Algorithm::Sha256 => decode(state).map(Digester::Sha256),
        Algorithm::Sha512 => decode(state).map(Digester::Sha512),
    }
    .ok_or(refused)
}

fn decode<H: SerializableState>(state: &[u8]) -> Option<H> {
    let array = state.try_into().ok()?;
    H::deserialize(&array).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;

    fn hashed(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut d = Digester::new(algorithm);
        d.update(data);
        d.finish()
    }

    #[test]
    fn a_saved_hash_continues_to_the_same_digest_wherever_it_stopped() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            // Stops at block boundaries, inside blocks, at zero and at the end.
            for split in [0, 1, 63, 64, 65, 127, 128, 129, 500, 999, 1000] {
                let mut first = Digester::new(algorithm);
                first.update(&data[..split]);
                let stored = save(&first);
                let mut resumed = load(algorithm, &stored).expect("decodes");
                resumed.update(&data[split..]);
                assert_eq!(
                    resumed.finish(),
                    hashed(algorithm, &data),
                    "{algorithm:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn states_of_another_algorithm_format_or_length_are_refused() {
        let sha256 = save(&Digester::new(Algorithm::Sha256));
        let sha512 = save(&Digester::new(Algorithm::Sha512));
        assert!(load(Algorithm::Sha512, &sha256).is_err());
        assert!(load(Algorithm::Sha256, &sha512).is_err());
        assert!(load(Algorithm::Sha256, &[]).is_err());
        let mut other_format = sha256.clone();
        other_format[0] = 2;
        assert!(load(Algorithm::Sha256, &other_format).is_err());
        assert!(load(Algorithm::Sha256, &sha256[..sha256.len() - 1]).is_err());
        // A fresh state's partial block is empty: a byte in it is no state sha2 wrote.
        let mut stray_byte = sha256.clone();
        if let Some(last) = stray_byte.last_mut() {
            *last = 200;
        }
        assert!(load(Algorithm::Sha256, &stray_byte).is_err());
    }
}
