#![allow(dead_code)]
pub mod peers;
