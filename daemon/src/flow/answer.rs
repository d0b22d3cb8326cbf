//! What a proxy inbound tells its client once the flow is routed and dialled ([`Answer`]), and
//! TPROXY's nothing ([`Transparent`]).

use std::{future::Future, io};

use tokio::net::TcpStream;

use crate::outbound;

/// The part of a proxy protocol's handshake that follows routing: telling the client whether
/// its tunnel is open. TPROXY has none.
pub trait Answer: Send {
    /// Whether the client waits for the answer before sending anything (then sniffing, which
    /// needs the client's first bytes, must answer first).
    fn waits(&self) -> bool;

    /// Tells the client the outcome; returns the bytes written (handshake, not payload).
    fn answer(
        &mut self,
        client: &mut TcpStream,
        outcome: Result<(), &outbound::Error>,
    ) -> impl Future<Output = io::Result<u64>> + Send;
}

/// TPROXY: the client never knew there was a proxy.
#[derive(Debug)]
pub struct Transparent;

impl Answer for Transparent {
    fn waits(&self) -> bool {
        false
    }

    async fn answer(
        &mut self,
        _: &mut TcpStream,
        _: Result<(), &outbound::Error>,
    ) -> io::Result<u64> {
        Ok(0)
    }
}
