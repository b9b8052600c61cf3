//! The firmware cache against real parts: a SQLite store in a temporary state folder, a
//! real HTTP origin on loopback that misbehaves on cue, and the fan-out server over TCP.

mod adu;
mod downloads;
mod eviction;
mod manifests;
mod serving;
mod support;
