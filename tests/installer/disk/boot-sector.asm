; The test disk's BIOS boot code (the first 440 bytes of its MBR; the partition table follows).
; SeaBIOS, asked by iPXE's local-boot answer (`sanboot --no-describe --drive 0x80`), loads
; sector 0 of the first disk to 0x0000:0x7c00 and jumps to it in real mode. This prints a
; marker on COM1 (I/O port 0x3f8; QEMU's UART needs no set-up to transmit) and halts, so the
; lab test sees on the serial console that the VM ran its disk, not another network boot.
bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax              ; lodsb reads DS:SI
    cld
    mov si, marker
    mov dx, 0x3f8
print:
    lodsb
    test al, al
    jz halt
    out dx, al
    jmp print
halt:
    hlt
    jmp halt
marker: db "provision-test-disk: booted from disk (BIOS)", 13, 10, 0
times 440 - ($ - $$) db 0
