package criurun

import (
	"encoding/binary"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/fown"
	"github.com/checkpoint-restore/go-criu/v7/crit/images/timerfd"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
)

func timerEntry(vsec, vnsec, isec, insec, ticks uint64, flags uint32) *fdinfo.FileEntry {
	return &fdinfo.FileEntry{Type: fdinfo.FdTypes_TIMERFD.Enum(), Id: proto.Uint32(7), Tfd: &timerfd.TimerfdEntry{
		Id: proto.Uint32(7), Flags: proto.Uint32(2), Fown: &fown.FownEntry{Uid: proto.Uint32(0), Euid: proto.Uint32(0), Signum: proto.Uint32(0), PidType: proto.Uint32(0), Pid: proto.Uint32(0)}, Clockid: proto.Uint32(1), Ticks: proto.Uint64(ticks),
		SettimeFlags: proto.Uint32(flags), Vsec: proto.Uint64(vsec), Vnsec: proto.Uint64(vnsec), Isec: proto.Uint64(isec), Insec: proto.Uint64(insec),
	}}
}

// Only a periodic relative timer that expired unread (it_value 0, ticks pending) is re-armed, one
// period ahead; every other record stays byte for byte.
func TestRearmTimerfds(t *testing.T) {
	entries := []*fdinfo.FileEntry{
		timerEntry(0, 0, 0, 20_000_000, 1, 0),     // expired during the dump: re-armed
		timerEntry(0, 5_000, 0, 20_000_000, 0, 0), // armed: as it was
		timerEntry(0, 0, 1, 0, 0, 0),              // disarmed by the app: as it was
		timerEntry(0, 0, 0, 0, 1, 0),              // one-shot, expired: as it was
		timerEntry(0, 0, 2, 0, 3, 1),              // absolute time: CRIU adds the clock's now itself
		{Type: fdinfo.FdTypes_EVENTFD.Enum(), Id: proto.Uint32(8)},
	}
	img := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	for _, e := range entries {
		b, err := proto.Marshal(e)
		require.NoError(t, err)
		img = binary.LittleEndian.AppendUint32(img, uint32(len(b)))
		img = append(img, b...)
	}
	out, n, err := rearmTimerfds(img)
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	assert.Equal(t, img[:8], out[:8], "the magic")
	var got []*fdinfo.FileEntry
	for off := 8; off < len(out); {
		size := int(binary.LittleEndian.Uint32(out[off:]))
		var fe fdinfo.FileEntry
		require.NoError(t, proto.Unmarshal(out[off+4:off+4+size], &fe))
		got = append(got, &fe)
		off += 4 + size
	}
	require.Len(t, got, len(entries))
	assert.Equal(t, uint64(20_000_000), got[0].GetTfd().GetVnsec(), "expires one period after the restore")
	assert.Equal(t, uint64(1), got[0].GetTfd().GetTicks(), "the pending ticks stay pending")
	for i := 1; i < len(entries); i++ {
		assert.True(t, proto.Equal(entries[i], got[i]), "entry %d unchanged", i)
	}
	_, _, err = rearmTimerfds(img[:len(img)-1])
	assert.ErrorContains(t, err, "overruns the image")
}
