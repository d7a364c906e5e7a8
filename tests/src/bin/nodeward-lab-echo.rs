//! The lab's workload: a TCP and UDP echo server that a lab pod runs in its network namespace.
//!
//! `nodeward-lab-echo --tcp 8080,9090 --udp 5353`. Binds `[::]` (dual stack) and falls back to
//! `0.0.0.0` when the namespace has no IPv6. Echoes every TCP byte and every UDP datagram back.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let list = match arg.as_str() {
            "--tcp" => &mut tcp,
            "--udp" => &mut udp,
            other => bail!("unknown argument {other:?} (usage: --tcp P,P --udp P,P)"),
        };
        let value = args.next().context("missing port list")?;
        for port in value.split(',').filter(|p| !p.is_empty()) {
            list.push(
                port.parse::<u16>()
                    .with_context(|| format!("bad port {port:?}"))?,
            );
        }
    }
    let mut threads = Vec::new();
    for port in tcp {
        let listener = bind(port, TcpListener::bind)?;
        threads.push(std::thread::spawn(move || serve_tcp(&listener)));
    }
    for port in udp {
        let socket = bind(port, UdpSocket::bind)?;
        threads.push(std::thread::spawn(move || serve_udp(&socket)));
    }
    println!("ready");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn bind<T>(port: u16, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> anyhow::Result<T> {
    bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        .with_context(|| format!("binding port {port}"))
}

fn serve_tcp(listener: &TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || echo(stream));
    }
}

fn echo(mut stream: TcpStream) {
    // An idle connection is closed after a while so that a lab never accumulates threads.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn serve_udp(socket: &UdpSocket) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
}
