//! Wire formats tpacct speaks as a client and as a server: pure encoding and bounded
//! decoding, no I/O.

pub mod socks5;
