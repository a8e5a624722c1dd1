//! Reading checkpoints and writing outputs: memory-mapped safetensors, checkpoint folders,
//! planned output shards, and the resume journal.

pub mod checkpoint;
pub mod journal;
pub mod safetensors;
pub mod shards;
