//! SRP-6a as Espressif's Security 2 uses it: the RFC 5054 3072-bit group, g = 5, SHA-512.
//!
//! Espressif-specific choices (esp-protocomm.md §7): `k = H(N ‖ PAD(g))`,
//! `u = H(PAD(A) ‖ PAD(B))`, `x = H(s ‖ H(I ‖ ":" ‖ p))` with the salt as stored,
//! `K = H(minimal(S))`, and `M1 = H((H(N) ⊕ H(PAD(g))) ‖ H(I) ‖ s ‖ A ‖ B ‖ K)` over the
//! exact bytes that crossed the wire.

use std::sync::LazyLock;

use num_bigint::BigUint;
use sha2::{Digest, Sha512};

/// Bytes in N, and so in every padded value.
pub const N_LEN: usize = 384;

/// RFC 5054 appendix A, the 3072-bit group (also RFC 3526 group 15).
const N_HEX: [&str; 12] = [
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74",
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437",
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05",
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB",
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B",
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718",
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33",
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7",
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864",
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2",
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
];

/// The group: N, g, and the values derived from them once.
pub(crate) struct Group {
    pub(crate) n: BigUint,
    pub(crate) g: BigUint,
    /// `k = H(N ‖ PAD(g))`.
    pub(crate) k: BigUint,
    /// `H(N) ⊕ H(PAD(g))`, the first input of M1.
    pub(crate) hn_xor_hg: [u8; 64],
}

pub(crate) static GROUP: LazyLock<Group> = LazyLock::new(|| {
    let n = BigUint::parse_bytes(N_HEX.concat().as_bytes(), 16).expect("N is valid hex");
    let g = BigUint::from(5u32);
    let n_bytes = pad(&n);
    let g_bytes = pad(&g);
    let k = BigUint::from_bytes_be(&sha512(&[&n_bytes, &g_bytes]));
    let hn = sha512(&[&n_bytes]);
    let hg = sha512(&[&g_bytes]);
    let mut hn_xor_hg = [0u8; 64];
    for (out, (a, b)) in hn_xor_hg.iter_mut().zip(hn.iter().zip(hg.iter())) {
        *out = a ^ b;
    }
    Group { n, g, k, hn_xor_hg }
});

/// SHA-512 over the concatenation of `parts`.
pub(crate) fn sha512(parts: &[&[u8]]) -> [u8; 64] {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// `PAD(x)`: big-endian, left-padded with zeros to [`N_LEN`] bytes.
pub(crate) fn pad(value: &BigUint) -> Vec<u8> {
    let bytes = value.to_bytes_be();
    let mut out = vec![0u8; N_LEN.saturating_sub(bytes.len())];
    out.extend_from_slice(&bytes);
    out
}

/// Big-endian without leading zeros (zero is one zero byte, as `to_bytes_be` gives).
pub(crate) fn minimal(value: &BigUint) -> Vec<u8> {
    value.to_bytes_be()
}

/// `x = H(s ‖ H(I ‖ ":" ‖ p))`, salt used verbatim.
pub(crate) fn private_key(username: &[u8], password: &[u8], salt: &[u8]) -> BigUint {
    let inner = sha512(&[username, b":", password]);
    BigUint::from_bytes_be(&sha512(&[salt, &inner]))
}

/// `u = H(PAD(A) ‖ PAD(B))`.
pub(crate) fn scrambler(a_pub: &BigUint, b_pub: &BigUint) -> BigUint {
    BigUint::from_bytes_be(&sha512(&[&pad(a_pub), &pad(b_pub)]))
}

/// `M1 = H((H(N) ⊕ H(PAD(g))) ‖ H(I) ‖ s ‖ A ‖ B ‖ K)` over wire bytes.
pub(crate) fn client_proof(
    username: &[u8],
    salt: &[u8],
    a_wire: &[u8],
    b_wire: &[u8],
    key: &[u8; 64],
) -> [u8; 64] {
    let hi = sha512(&[username]);
    sha512(&[&GROUP.hn_xor_hg, &hi, salt, a_wire, b_wire, key])
}

/// `M2 = H(A ‖ M1 ‖ K)`.
pub(crate) fn server_proof(a_wire: &[u8], m1: &[u8; 64], key: &[u8; 64]) -> [u8; 64] {
    sha512(&[a_wire, m1, key])
}

/// Makes the salt and verifier a device stores for `username`/`password` (what
/// `esp_prov --sec2_gen_cred` prints): `v = g^x mod N`, 384 bytes.
pub fn verifier(username: &[u8], password: &[u8], salt: &[u8]) -> Vec<u8> {
    let x = private_key(username, password, salt);
    pad(&GROUP.g.modpow(&x, &GROUP.n))
}
