//! One accepted client: dial the upstream, carry both directions through the link, and end
//! the way the link says (normally, or reset by an outage).
//!
//! Both directions run inside this one task over borrowed halves of the two sockets, so when
//! a reset outage ends the connection the task still owns the sockets and can close them
//! with a zero linger, which the peers see as a reset. Nothing here panics or ends the
//! emulator; what goes wrong is logged at debug.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::control::{self, Control};
use super::direction::{self, DirectionLink};
use super::profile::OutageMode;

/// Carries one client's connection to `upstream` until both directions are done, an outage
/// resets it, or the emulator stops (which drops this task and so closes both sockets).
pub(crate) async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    control: Arc<Control>,
) {
    let mut down = control.subscribe_down();
    let reset_mode = control.mode == OutageMode::Reset;
    if reset_mode && *down.borrow() {
        tracing::debug!(%peer, "link down (reset): closing the new connection");
        reset(&client);
        return;
    }
    // In a stall the link carries nothing, not even the upstream's handshake.
    control::wait_up(&mut down).await;

    let dialled = tokio::select! {
        dialled = TcpStream::connect(upstream) => dialled,
        () = control::wait_down(&mut down), if reset_mode => {
            tracing::debug!(%peer, "link down (reset) while dialling the upstream");
            reset(&client);
            return;
        }
    };
    let mut server = match dialled {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(%peer, %upstream, %error, "cannot reach the upstream; closing");
            reset(&client);
            return;
        }
    };
    for stream in [&client, &server] {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
    }
    tracing::debug!(%peer, %upstream, "link connection open");

    let carried = async {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = direction::run(
            client_read,
            server_write,
            DirectionLink {
                shaping: control.up_shaping.subscribe(),
                down: control.subscribe_down(),
                free_at: &control.up_free_at,
                delivered: &control.bytes_up,
                name: "up",
            },
        );
        let down = direction::run(
            server_read,
            client_write,
            DirectionLink {
                shaping: control.down_shaping.subscribe(),
                down: control.subscribe_down(),
                free_at: &control.down_free_at,
                delivered: &control.bytes_down,
                name: "down",
            },
        );
        tokio::join!(up, down);
    };
    let was_reset = tokio::select! {
        () = carried => false,
        () = control::wait_down(&mut down), if reset_mode => true,
    };
    if was_reset {
        tracing::debug!(%peer, "link down (reset): closing the connection");
        reset(&client);
        reset(&server);
    } else {
        tracing::debug!(%peer, "link connection done");
    }
}

/// Makes the coming close of `stream` a reset (RST) rather than an orderly end (FIN).
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "cannot set a zero linger; the close will be orderly");
    }
}
