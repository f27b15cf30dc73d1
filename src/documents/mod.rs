//! Clinical payload: C-CDA, XDM, rendering.

pub mod ccda;
pub mod index;
pub mod render;
pub mod xdm;
