//! Reading checkpoints and writing outputs: memory-mapped safetensors, checkpoint folders,
//! planned output shards, the resume journal, and the save folder's lock.

pub mod checkpoint;
pub mod journal;
pub mod lock;
pub mod safetensors;
pub mod shards;
