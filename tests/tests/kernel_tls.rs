//! Kernel TLS (kTLS) under a kernel that has it.
//!
//! The build machines' kernel has no CONFIG_TLS, so `cargo xtask test` also runs this binary
//! in a VM with Debian's 6.1 kernel: `cargo xtask vm-test --cargo-test "--workspace --test
//! kernel_tls"`, where `CLINK_REQUIRE_KTLS=1` turns a missing kTLS into a failure. On a host
//! without kTLS each test says so and skips. A kTLS test starts with
//! `clink_testbed::require_ktls`; a new binary of them joins `VM_TESTS` in xtask/src/main.rs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::libc;
use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv};
use rustls::{ContentType, ProtocolVersion, SupportedCipherSuite};

const PLAINTEXT: &[u8] = b"ClusterLink-rs: bytes the kernel encrypts";
/// TLS 1.3 record header: type application_data, legacy version 3.3, then a 2-byte length.
const HEADER: usize = 5;
/// AES-GCM's authentication tag.
const TAG: usize = 16;

/// The kernel takes TLS 1.3 keys for a socket and writes records a TLS library can read: the
/// proof that the VM's kernel offers what the kTLS data path hands it (ARCHITECTURE.md, "kTLS data path").
#[test]
fn ktls_available_in_the_vm() {
    if !clink_testbed::require_ktls("ktls_available_in_the_vm") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // AES-128-GCM with the libc struct the agent's kTLS code uses...
    let (key, salt, iv) = ([0x11; 16], [0x22; 4], [0x33; 8]);
    clink_testbed::set_tls_ulp(sender.as_fd()).expect("setsockopt(TCP_ULP, \"tls\")");
    // SAFETY: a plain C struct of integers and byte arrays, for which zero is valid.
    let mut info: libc::tls12_crypto_info_aes_gcm_128 = unsafe { std::mem::zeroed() };
    info.info.version = libc::TLS_1_3_VERSION;
    info.info.cipher_type = libc::TLS_CIPHER_AES_GCM_128;
    info.key = key;
    info.salt = salt;
    info.iv = iv;
    set_tls_tx(&sender, &info);
    sender.write_all(PLAINTEXT).unwrap();
    let record = read_record(&mut receiver);
    assert!(
        !record.windows(PLAINTEXT.len()).any(|w| w == PLAINTEXT),
        "the plaintext went out unencrypted"
    );

    // ...and AES-256-GCM (what rustls prefers), whose record rustls must decrypt.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut receiver, _) = listener.accept().unwrap();
    let (key, salt, iv) = ([0x44; 32], [0x55; 4], [0x66; 8]);
    clink_testbed::set_tls_ulp(sender.as_fd()).expect("setsockopt(TCP_ULP, \"tls\")");
    // SAFETY: a plain C struct of integers and byte arrays, for which zero is valid.
    let mut info: libc::tls12_crypto_info_aes_gcm_256 = unsafe { std::mem::zeroed() };
    info.info.version = libc::TLS_1_3_VERSION;
    info.info.cipher_type = libc::TLS_CIPHER_AES_GCM_256;
    info.key = key;
    info.salt = salt;
    info.iv = iv;
    set_tls_tx(&sender, &info);
    sender.write_all(PLAINTEXT).unwrap();
    let mut record = read_record(&mut receiver);

    let SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let mut nonce = [0; 12];
    nonce[..4].copy_from_slice(&salt);
    nonce[4..].copy_from_slice(&iv);
    let mut decrypter = suite.aead_alg.decrypter(AeadKey::from(key), Iv::new(nonce));
    let message = InboundOpaqueMessage::new(
        ContentType::ApplicationData,
        ProtocolVersion::TLSv1_2,
        &mut record[HEADER..],
    );
    let plain = decrypter
        .decrypt(message, 0)
        .expect("rustls decrypts the kernel's first record");
    assert_eq!(plain.typ, ContentType::ApplicationData);
    assert_eq!(plain.payload, PLAINTEXT);
}

/// Hands the kernel the send keys (`setsockopt(SOL_TLS, TLS_TX)`) of a kTLS socket.
fn set_tls_tx<T>(sock: &TcpStream, info: &T) {
    // SAFETY: `info` is one of the kernel's tls12_crypto_info_* structs, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TLS,
            libc::TLS_TX,
            (info as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SOL_TLS, TLS_TX): {}",
        std::io::Error::last_os_error()
    );
}

/// Reads one TLS 1.3 record carrying PLAINTEXT and checks its header: application data,
/// legacy version 3.3, and the length of the ciphertext, its inner content type and its tag.
fn read_record(receiver: &mut TcpStream) -> Vec<u8> {
    let mut record = vec![0; HEADER + PLAINTEXT.len() + 1 + TAG];
    receiver
        .read_exact(&mut record)
        .expect("one TLS record from the kTLS socket");
    assert_eq!(
        record[..3],
        [0x17, 0x03, 0x03],
        "TLS 1.3 application-data record header, got {:02x?}",
        &record[..HEADER]
    );
    let length = u16::from_be_bytes([record[3], record[4]]) as usize;
    assert_eq!(length, PLAINTEXT.len() + 1 + TAG, "record length");
    record
}
