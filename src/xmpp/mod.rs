//! The XMPP side: connect, presence, send, receive.
