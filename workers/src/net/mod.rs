//! virtio-net: the guest's frames to and from a host TAP device, with checksum and
//! segmentation offloads passed through in the vnet header both ways.

mod device;
mod header;
mod tap;

pub use device::{
    queues_for, NetDevice, NetError, NetSettings, NetStats, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
    NUM_QUEUES, RX_QUEUE, TX_QUEUE,
};
pub use header::{HeaderError, VnetHeader, ETH_HLEN, MAX_FRAME_LEN};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// A stable MAC address for a device named `name` (the VM's or the TAP's name): the QEMU
/// prefix 52:54:00, whose first byte has the locally administered bit set and the
/// multicast bit clear, then 24 bits of an FNV-1a hash of the name. The same name gives
/// the same address on every run, so the guest's view of its NIC does not change.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let [a, b, c, ..] = hash.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses, which no NIC may have.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| format!("{text:?} is not a MAC address like 52:54:00:12:34:56"))?;
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("{text:?} is not a MAC address like 52:54:00:12:34:56"))?;
    }
    if parts.next().is_some() {
        return Err(format!(
            "{text:?} is not a MAC address like 52:54:00:12:34:56"
        ));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_macs_are_stable_local_unicast() {
        let mac = mac_from_name("vm1");
        assert_eq!(mac, mac_from_name("vm1"));
        assert_ne!(mac, mac_from_name("vm2"));
        assert_eq!(mac[..3], [0x52, 0x54, 0x00]);
        assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:ef:00").is_err());
        assert!(parse_mac("52-54-00-ab-cd-ef").is_err());
    }
}
