package criurun

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// pagemapImage encodes a pagemap image as CRIU 4 writes it (nr_pages in field 5, compat 0).
func pagemapImage(pagesID uint32, entries []PagemapEntry) []byte {
	var out bytes.Buffer
	_ = binary.Write(&out, binary.LittleEndian, []uint32{imgCommonMagic, pagemapMagic})
	rec := func(b []byte) {
		_ = binary.Write(&out, binary.LittleEndian, uint32(len(b)))
		out.Write(b)
	}
	rec(protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), uint64(pagesID)))
	for _, e := range entries {
		var b []byte
		for _, f := range [][2]uint64{{1, e.Vaddr}, {2, 0}, {4, uint64(e.Flags)}, {5, e.NrPages}} {
			b = protowire.AppendVarint(protowire.AppendTag(b, protowire.Number(f[0]), protowire.VarintType), f[1])
		}
		rec(b)
	}
	return out.Bytes()
}

type memImages map[string][]byte

func (m memImages) OpenAt(name string) (checkpoint.ReaderAtCloser, int64, error) {
	b, ok := m[name]
	if !ok {
		return nil, 0, errors.New("no such image")
	}
	return nopCloser{bytes.NewReader(b)}, int64(len(b)), nil
}

type nopCloser struct{ io.ReaderAt }

func (nopCloser) Close() error { return nil }

func TestParsePagemap(t *testing.T) {
	img := pagemapImage(7, []PagemapEntry{
		{Vaddr: 0x1000, NrPages: 2, Flags: pePresent},           // stack: restored by CRIU
		{Vaddr: 0x10000, NrPages: 3, Flags: pePresent | peLazy}, // heap
		{Vaddr: 0x20000, NrPages: 1, Flags: pePresent | peLazy},
	})
	pm, err := ParsePagemap(bytes.NewReader(img))
	require.NoError(t, err)
	assert.Equal(t, "pages-7.img", pm.PagesImage())
	require.Len(t, pm.Entries, 3)
	assert.Equal(t, []int64{0, 2 * PageSize, 5 * PageSize}, []int64{pm.Entries[0].Offset, pm.Entries[1].Offset, pm.Entries[2].Offset})
	assert.False(t, pm.Entries[0].Lazy())
	e, ok := pm.find(0x11000)
	assert.True(t, ok)
	assert.Equal(t, uint64(0x10000), e.Vaddr)
	_, ok = pm.find(0x13000)
	assert.False(t, ok, "a hole between runs")

	_, err = ParsePagemap(bytes.NewReader(pagemapImage(1, []PagemapEntry{{Vaddr: 0x1000, NrPages: 1, Flags: peParent}})))
	assert.ErrorContains(t, err, "parent")
	_, err = ParsePagemap(bytes.NewReader(pagemapImage(1, []PagemapEntry{{Vaddr: 0x5000, NrPages: 2, Flags: pePresent}, {Vaddr: 0x6000, NrPages: 1, Flags: pePresent}})))
	assert.ErrorContains(t, err, "overlaps")
	_, err = ParsePagemap(bytes.NewReader([]byte{1, 2, 3, 4, 5, 6, 7, 8}))
	assert.ErrorContains(t, err, "not a pagemap")
}

// The page source serves lazy runs only, cut at the end of the run; pages the daemon must not get
// (not lazy, unknown task) are an error.
func TestPageServerRead(t *testing.T) {
	pages := make([]byte, 6*PageSize)
	for i := range pages {
		pages[i] = byte(i / PageSize)
	}
	pm, err := ParsePagemap(bytes.NewReader(pagemapImage(1, []PagemapEntry{
		{Vaddr: 0x1000, NrPages: 2, Flags: pePresent},
		{Vaddr: 0x10000, NrPages: 4, Flags: pePresent | peLazy},
	})))
	require.NoError(t, err)
	s := NewPageServer(map[uint64]*Pagemap{42: pm}, memImages{"pages-1.img": pages})
	defer s.Close()
	data, n, err := s.read(42, 0x11000, 8, nil) // 8 asked, 3 left in the run
	require.NoError(t, err)
	assert.Equal(t, uint64(3), n)
	assert.Equal(t, pages[3*PageSize:6*PageSize], data, "run 2 starts at image page 2; 0x11000 is its second page")
	_, _, err = s.read(42, 0x1000, 1, nil)
	assert.ErrorContains(t, err, "no lazy pages", "a run CRIU restores itself")
	_, _, err = s.read(7, 0x10000, 1, nil)
	assert.ErrorContains(t, err, "no pagemap")
}

// The daemon's book of missing runs: what went in, was unmapped or moved.
func TestLazySpans(t *testing.T) {
	task := &lazyTask{spans: []span{{0x10000, 0x20000, 0x10000}, {0x30000, 0x31000, 0x30000}}}
	assert.Equal(t, 0, task.find(0x1f000))
	assert.Equal(t, -1, task.find(0x20000))
	task.drop(0x12000, 0x14000) // a copy, or madvise(DONTNEED), in the middle of a run
	assert.Equal(t, []span{{0x10000, 0x12000, 0x10000}, {0x14000, 0x20000, 0x14000}, {0x30000, 0x31000, 0x30000}}, task.spans)
	task.remap(0x14000, 0x50000, 0x2000) // mremap of part of a run: its image address travels
	assert.Equal(t, []span{{0x10000, 0x12000, 0x10000}, {0x16000, 0x20000, 0x16000}, {0x30000, 0x31000, 0x30000}, {0x50000, 0x52000, 0x14000}}, task.spans)
	task.remap(0x50000, 0x30000, 0x2000) // onto a run: what was there is gone
	assert.Equal(t, []span{{0x10000, 0x12000, 0x10000}, {0x16000, 0x20000, 0x16000}, {0x30000, 0x32000, 0x14000}}, task.spans)
}

// Read-ahead returns what the image holds, for sequential and random readers alike, and an error
// only for the blocks that are asked for.
func TestReadAhead(t *testing.T) {
	img := make([]byte, 20*raBlockSize+12345)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range img {
		img[i] = byte(r.Uint32())
	}
	ra := newReadAhead(bytes.NewReader(img), int64(len(img)))
	for off := int64(0); off < int64(len(img)); off += 4 << 20 {
		n := min(4<<20, int64(len(img))-off)
		b := make([]byte, n)
		_, err := ra.ReadAt(b, off)
		require.NoError(t, err)
		require.True(t, bytes.Equal(img[off:off+n], b), "sequential read at %d", off)
	}
	for range 200 {
		off := r.Int64N(int64(len(img)) - 3*PageSize)
		b := make([]byte, 1+r.IntN(3*PageSize))
		_, err := ra.ReadAt(b, off)
		require.NoError(t, err)
		require.True(t, bytes.Equal(img[off:off+int64(len(b))], b), "random read at %d", off)
	}
	bad := newReadAhead(failAt{bytes.NewReader(img), 5 * raBlockSize}, int64(len(img)))
	_, err := bad.ReadAt(make([]byte, raBlockSize), 3*raBlockSize) // reads ahead into block 5
	require.NoError(t, err)
	_, err = bad.ReadAt(make([]byte, raBlockSize), 5*raBlockSize)
	assert.ErrorContains(t, err, "chunk does not verify")
}

type failAt struct {
	r   io.ReaderAt
	off int64
}

func (f failAt) ReadAt(p []byte, off int64) (int, error) {
	if off <= f.off && f.off < off+int64(len(p)) {
		return 0, errors.New("chunk does not verify")
	}
	return f.r.ReadAt(p, off)
}
