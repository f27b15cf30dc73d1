#![allow(dead_code)]
pub mod peers;
pub mod servers;
pub mod world;
