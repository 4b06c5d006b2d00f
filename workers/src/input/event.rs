//! `virtio_input_event` (virtio 1.2, 5.8.6.2: le16 type, le16 code, le32 value) and the
//! datagrams of them the display worker sends.

use thiserror::Error;

pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const SYN_REPORT: u16 = 0;
pub const REL_WHEEL: u16 = 0x08;
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
/// The tablet's axes run 0..=ABS_MAX whatever the screen's size, as QEMU's tablet does.
pub const ABS_MAX: u32 = 0x7fff;

/// Bytes of one event on the wire.
pub const EVENT_SIZE: usize = 8;
/// Most events one datagram may carry: a key with a shift pressed and released around it,
/// or a pointer move with every button changing, is far fewer.
pub const MAX_EVENTS_PER_REPORT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputRecord {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl InputRecord {
    pub const fn new(kind: u16, code: u16, value: u32) -> Self {
        Self { kind, code, value }
    }

    pub const fn syn() -> Self {
        Self::new(EV_SYN, SYN_REPORT, 0)
    }

    pub fn to_bytes(self) -> [u8; EVENT_SIZE] {
        let mut bytes = [0u8; EVENT_SIZE];
        bytes[0..2].copy_from_slice(&self.kind.to_le_bytes());
        bytes[2..4].copy_from_slice(&self.code.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.value.to_le_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let kind = u16::from_le_bytes(bytes.get(0..2)?.try_into().ok()?);
        let code = u16::from_le_bytes(bytes.get(2..4)?.try_into().ok()?);
        let value = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
        Some(Self { kind, code, value })
    }
}

/// One report as a datagram: the events, then SYN_REPORT.
pub fn encode_report(events: &[InputRecord]) -> Vec<u8> {
    events
        .iter()
        .chain(std::iter::once(&InputRecord::syn()))
        .flat_map(|event| event.to_bytes())
        .collect()
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("a report of {0} bytes is not a whole number of 1 to {MAX_EVENTS_PER_REPORT} events")]
    Length(usize),
    #[error("a report does not end with SYN_REPORT")]
    Unterminated,
    #[error("event type {kind:#x} code {code:#x} value {value:#x} is not one this device has")]
    Unsupported { kind: u16, code: u16, value: u32 },
}

/// Checks a datagram from the display worker: whole events, only the keys, buttons and
/// axes the device advertises with values in range, ending with SYN_REPORT. The display
/// worker is sandboxed but talks to viewers, so its word is checked, not trusted.
pub fn decode_report(bytes: &[u8]) -> Result<Vec<InputRecord>, ReportError> {
    let count = bytes.len() / EVENT_SIZE;
    if !bytes.len().is_multiple_of(EVENT_SIZE) || !(1..=MAX_EVENTS_PER_REPORT).contains(&count) {
        return Err(ReportError::Length(bytes.len()));
    }
    let events: Vec<InputRecord> = bytes
        .chunks_exact(EVENT_SIZE)
        .filter_map(InputRecord::from_bytes)
        .collect();
    if events.last() != Some(&InputRecord::syn()) {
        return Err(ReportError::Unterminated);
    }
    for &event in &events {
        if !is_supported(event) {
            return Err(ReportError::Unsupported {
                kind: event.kind,
                code: event.code,
                value: event.value,
            });
        }
    }
    Ok(events)
}

fn is_supported(event: InputRecord) -> bool {
    let InputRecord { kind, code, value } = event;
    match kind {
        EV_SYN => code == SYN_REPORT && value == 0,
        // 0 up, 1 down, 2 autorepeat.
        EV_KEY => super::keymap::is_advertised_key(code) && value <= 2,
        EV_ABS => matches!(code, ABS_X | ABS_Y) && value <= ABS_MAX,
        // One notch either way per event.
        EV_REL => code == REL_WHEEL && (value == 1 || value == u32::MAX),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let events = [
            InputRecord::new(EV_KEY, 30, 1),
            InputRecord::new(EV_ABS, ABS_X, 100),
        ];
        let bytes = encode_report(&events);
        assert_eq!(bytes.len(), 24);
        let decoded = decode_report(&bytes).unwrap();
        assert_eq!(decoded[..2], events);
        assert_eq!(decoded[2], InputRecord::syn());
    }

    #[test]
    fn bad_reports_are_refused() {
        assert_eq!(decode_report(&[]), Err(ReportError::Length(0)));
        assert_eq!(decode_report(&[0; 7]), Err(ReportError::Length(7)));
        assert_eq!(decode_report(&[0; 8 * 17]), Err(ReportError::Length(136)));
        let unterminated = InputRecord::new(EV_KEY, 30, 1).to_bytes();
        assert_eq!(decode_report(&unterminated), Err(ReportError::Unterminated));
        for bad in [
            InputRecord::new(EV_KEY, 0x2ff, 1),
            InputRecord::new(EV_KEY, 30, 3),
            InputRecord::new(EV_ABS, ABS_X, ABS_MAX + 1),
            InputRecord::new(EV_ABS, 0x2f, 1),
            InputRecord::new(EV_REL, REL_WHEEL, 5),
            InputRecord::new(0x15, 0, 0),
        ] {
            assert!(
                matches!(
                    decode_report(&encode_report(&[bad])),
                    Err(ReportError::Unsupported { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
