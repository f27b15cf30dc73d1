#![allow(dead_code)]
pub mod hisp;
pub mod peers;
pub mod servers;
pub mod sink;
pub mod world;
