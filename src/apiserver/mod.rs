//! Code shared by the modes that talk to the apiserver: the reflector caches resolution reads
//! (`index`) and the owner lookup of a pod being created (`owner`). Everything that reads or
//! writes cluster objects lives here, in `webhook/` or in `controller/`; `core/` and `resolve/`
//! never do.

pub mod index;
pub mod owner;
