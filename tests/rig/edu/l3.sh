# shellcheck shell=sh
# The level-3 test of `edu`: find the edu, turn bus mastering on, and drive its DMA with busybox devmem.
# Sourced by resources/guest-init as /test.sh (rig_check comes from there); it then powers off.
# Buffers are in the low 1 MiB's reserved area (0xd0000..0xd3000: in vmm's e820 it is not RAM, so the
# kernel lets /dev/mem reach it; vmm's soft IOMMU domain maps all guest memory IOVA = GPA).
dev=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then dev=$d; fi
done
rig_check "the edu (1234:11e8) is on level 3's PCI bus (${dev:-none})" test -n "$dev"
bar=$(cut -d' ' -f1 "$dev/resource" | head -n1)
echo "level 3: edu at $dev, BAR 0 at $bar"
r() { devmem $((bar + $1)) 32; }
w() { devmem $((bar + $1)) 32 "$2"; }
# Memory space and bus mastering on: the low byte of the PCI command register (config offset 4) = 0x06.
printf '\006' | dd of="$dev/config" bs=1 seek=4 conv=notrunc 2>/dev/null
cmd=$(od -An -tx1 -j4 -N1 "$dev/config" | tr -d ' ')
rig_check "memory space and bus mastering are on (command low byte $cmd)" test "$cmd" = 06
id=$(r 0)
rig_check "identification reads 0x010000ED ($id)" test "$id" = 0x010000ED
w 4 0x12345678
live=$(r 4)
rig_check "liveness reads the inverse ($live)" test "$live" = 0xEDCBA987
w 8 10
fact=$(r 8)
rig_check "10! = 3628800 = 0x00375F00 ($fact)" test "$fact" = 0x00375F00

# dma SRC DST COUNT COMMAND: program and start one transfer (64-bit registers, low halves; high halves 0).
dma() {
  w 0x80 "$1"; w 0x84 0; w 0x88 "$2"; w 0x8c 0; w 0x90 "$3"; w 0x94 0; w 0x98 "$4"
}
# words ADDR: the 16 words at ADDR.
words() {
  i=0
  while [ $i -lt 64 ]; do devmem $(($1 + i)) 32; i=$((i + 4)); done | tr '\n' ' '
}
i=0
while [ $i -lt 64 ]; do devmem $((0xd0000 + i)) 32 $((0x5a000000 + i * 0x10101)); i=$((i + 4)); done
want=$(words 0xd0000)
dma 0xd0000 0x40000 64 1     # RAM -> device buffer
done1=$(r 0x98)
dma 0x40000 0xd1000 64 7     # device buffer -> RAM, interrupt 0x100 when done
got=$(words 0xd1000)
echo "level 3: wrote   $want"
echo "level 3: read    $got"
rig_check "the start bit reads back clear ($done1)" test "$done1" = 0x00000000
rig_check "RAM -> edu -> RAM: the 64 bytes came back through the soft IOMMU" test "$got" = "$want"
irq=$(r 0x24)
rig_check "interrupt status 0x100 after the DMA ($irq)" test "$irq" = 0x00000100
w 0x64 0x100
irq=$(r 0x24)
rig_check "acknowledged ($irq)" test "$irq" = 0x00000000
# 240 MiB is beyond level 3's 128 MiB: the domain does not map it; the transfer is refused as a whole.
dma 0xf000000 0x40000 64 1
dma 0x40000 0xd2000 64 3
got=$(words 0xd2000)
rig_check "a read beyond guest RAM copied nothing: the buffer still holds the first 64 bytes" test "$got" = "$want"
