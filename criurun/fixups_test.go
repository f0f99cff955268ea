package criurun

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fown"
	sk_inet "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-inet"
	sk_opts "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-opts"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/timerfd"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

func noOwner() *fown.FownEntry {
	z := proto.Uint32(0)
	return &fown.FownEntry{Uid: z, Euid: z, Signum: z, PidType: z, Pid: z}
}

func timerEntry(vsec, vnsec, isec, insec, ticks uint64, flags uint32) *fdinfo.FileEntry {
	return &fdinfo.FileEntry{Type: fdinfo.FdTypes_TIMERFD.Enum(), Id: proto.Uint32(7), Tfd: &timerfd.TimerfdEntry{
		Id: proto.Uint32(7), Flags: proto.Uint32(2), Fown: noOwner(), Clockid: proto.Uint32(1), Ticks: proto.Uint64(ticks),
		SettimeFlags: proto.Uint32(flags), Vsec: proto.Uint64(vsec), Vnsec: proto.Uint64(vnsec), Isec: proto.Uint64(isec), Insec: proto.Uint64(insec),
	}}
}

// inetEntry is an inet socket as CRIU records it: addresses as 32-bit words read in host order.
func inetEntry(proto_ uint32, local, remote netip.AddrPort) *fdinfo.FileEntry {
	words := func(a netip.Addr) []uint32 {
		b := a.AsSlice()
		var out []uint32
		for i := 0; i < len(b); i += 4 {
			out = append(out, binary.LittleEndian.Uint32(b[i:]))
		}
		return out
	}
	fam := uint32(unix.AF_INET)
	if local.Addr().Is6() {
		fam = unix.AF_INET6
	}
	z := proto.Uint32(0)
	return &fdinfo.FileEntry{Type: fdinfo.FdTypes_INETSK.Enum(), Id: proto.Uint32(9), Isk: &sk_inet.InetSkEntry{
		Id: proto.Uint32(9), Ino: proto.Uint32(1234), Family: proto.Uint32(fam), Type: proto.Uint32(unix.SOCK_DGRAM), Proto: proto.Uint32(proto_),
		State: proto.Uint32(1), SrcPort: proto.Uint32(uint32(local.Port())), DstPort: proto.Uint32(uint32(remote.Port())), Flags: z, Backlog: z,
		SrcAddr: words(local.Addr()), DstAddr: words(remote.Addr()), Fown: noOwner(),
		Opts: &sk_opts.SkOptsEntry{SoSndbuf: z, SoRcvbuf: z, SoSndTmoSec: proto.Uint64(0), SoSndTmoUsec: proto.Uint64(0), SoRcvTmoSec: proto.Uint64(0), SoRcvTmoUsec: proto.Uint64(0)},
	}}
}

func image(t *testing.T, entries []*fdinfo.FileEntry) []byte {
	img := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	for _, e := range entries {
		b, err := proto.Marshal(e)
		require.NoError(t, err)
		img = binary.LittleEndian.AppendUint32(img, uint32(len(b)))
		img = append(img, b...)
	}
	return img
}

func records(t *testing.T, img []byte) []*fdinfo.FileEntry {
	var got []*fdinfo.FileEntry
	for off := 8; off < len(img); {
		size := int(binary.LittleEndian.Uint32(img[off:]))
		var fe fdinfo.FileEntry
		require.NoError(t, proto.Unmarshal(img[off+4:off+4+size], &fe))
		got = append(got, &fe)
		off += 4 + size
	}
	return got
}

// Only the entries a fix is meant for change; every other record stays as it was.
func TestFixFiles(t *testing.T) {
	ap := netip.MustParseAddrPort
	entries := []*fdinfo.FileEntry{
		timerEntry(0, 0, 0, 20_000_000, 1, 0),                                    // 0: expired during the dump: re-armed
		inetEntry(unix.IPPROTO_UDP, ap("10.213.1.2:40000"), ap("10.96.0.10:53")), // 1: connected UDP from the pod IP: cleared
		inetEntry(unix.IPPROTO_UDP, ap("[fd00::2]:40001"), ap("[fd00::53]:53")),  // 2: the same in IPv6
		timerEntry(0, 5_000, 0, 20_000_000, 0, 0),                                // armed
		timerEntry(0, 0, 1, 0, 0, 0),                                             // disarmed by the app
		timerEntry(0, 0, 0, 0, 1, 0),                                             // one-shot, expired
		timerEntry(0, 0, 2, 0, 3, unix.TFD_TIMER_ABSTIME),                        // absolute: CRIU adds the clock's now
		inetEntry(unix.IPPROTO_UDP, ap("127.0.0.1:40002"), ap("127.0.0.1:8125")), // loopback
		inetEntry(unix.IPPROTO_UDP, ap("10.213.1.2:5353"), ap("0.0.0.0:0")),      // bound, not connected (refused at dump)
		inetEntry(unix.IPPROTO_TCP, ap("10.213.1.2:40003"), ap("10.96.0.1:443")), // a TCP connection: restored closed
		{Type: fdinfo.FdTypes_EVENTFD.Enum(), Id: proto.Uint32(8)},
	}
	img := image(t, entries)
	out, fx, err := fixFiles(img)
	require.NoError(t, err)
	assert.Equal(t, Fixes{Timers: 1, UDP: 2}, fx)
	assert.Equal(t, img[:8], out[:8], "the magic")
	got := records(t, out)
	require.Len(t, got, len(entries))
	assert.Equal(t, uint64(20_000_000), got[0].GetTfd().GetVnsec(), "expires one period after the restore")
	assert.Equal(t, uint64(1), got[0].GetTfd().GetTicks(), "the pending ticks stay pending")
	for i, n := range []int{1, 4} {
		sk := got[i+1].GetIsk()
		assert.Equal(t, make([]uint32, n), sk.GetSrcAddr(), "local address left to the new pod")
		assert.Equal(t, entries[i+1].GetIsk().GetSrcPort(), sk.GetSrcPort(), "same port")
		assert.Equal(t, entries[i+1].GetIsk().GetDstAddr(), sk.GetDstAddr(), "same peer")
	}
	for i := 3; i < len(entries); i++ {
		assert.True(t, proto.Equal(entries[i], got[i]), "entry %d unchanged", i)
	}
	_, _, err = fixFiles(img[:len(img)-1])
	assert.ErrorContains(t, err, "overruns the image")
}
