//! rayfence's eBPF programs. Thin entry points per hook and direction; the decision
//! logic lives in the modules.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

    #[classifier]
    pub fn tc_ingress(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

// On the host the crate is an empty binary, so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
