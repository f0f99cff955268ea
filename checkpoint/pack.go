package checkpoint

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// The pack: a checkpoint's CRIU images stored as chunks (format 2, issue 16).
//
//	<dir>/.chunks/                 chunks shared by the checkpoints of the container
//	  <pack id>.pack               chunk records (see sealChunk) appended one after the other
//	  .tmp-<pack id>               a pack file being written by a dump
//
// Each image is cut into chunks of Pack.ChunkSize bytes (the last one shorter). A chunk of zeros
// is not stored. Any other is named by a keyed hash of its plaintext (Pack.Naming: keyed BLAKE3,
// or HMAC-SHA256 in packs written before BLAKE3) under the chunk naming key (never a plain hash:
// a pod reading its volume must not be able to confirm a guess of its memory), compressed when
// that saves 10 % or more, encrypted with AES-256-GCM under the data key of the checkpoint that
// first wrote it (fresh random nonce per chunk; the record's header, the chunk's name and its
// key's id are additional data), and appended to a pack file of the dump.
// A pack file is written by one dump only, under a temporary name, synced and renamed into place
// at the end: never written again, never replaced. (One file per chunk cost a file creation per
// 256 KiB, which capped the writer near 100 MB/s on this VM; see docs/agent.md.)
//
// A chunk equal to one of the previous checkpoint is not written again: the new manifest
// references it where it is (pack file, offset), with the data key that encrypts it. The
// manifest, signed by the agents' key, lists every chunk of every image (name, length, key, pack
// file, offset, stored length), so what a reader returns is exactly what the agent dumped: each
// chunk is decrypted, decompressed and its name checked before a byte of it is returned.

// chunksDir is the chunk store in a container's checkpoint directory: its leading dot keeps it
// out of List, PruneAt and ValidID.
const chunksDir = ".chunks"

// DefaultChunkSize: see the measurements in docs/agent.md ("Checkpoint store").
const DefaultChunkSize = 256 << 10

// maxChunkSize bounds what a manifest may ask a reader to allocate per chunk.
const maxChunkSize = 16 << 20

// Codec compresses chunks.
type Codec uint8

// Codecs. The byte is stored in each chunk's header; zero, in PackOptions, means DefaultCodec.
const (
	CodecS2   Codec = 1
	CodecZstd Codec = 2
	CodecRaw  Codec = 3 // stored as is
)

// DefaultCodec: see docs/agent.md ("Checkpoint store") for the measurement that chose it.
const DefaultCodec = CodecS2

func (c Codec) String() string {
	switch c {
	case CodecRaw:
		return "raw"
	case CodecS2:
		return "s2"
	case CodecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Pack lists a checkpoint's images stored as chunks (Manifest.Pack).
type Pack struct {
	ChunkSize int `json:"chunkSize"`
	// Naming is the keyed hash naming the chunks: NamingBLAKE3, or empty for HMAC-SHA256 (packs
	// written before BLAKE3, still read).
	Naming string `json:"naming,omitempty"`
	// Keys are the wrapped data keys the chunks need: Keys[0] is this checkpoint's, the others
	// came with chunks reused from older checkpoints. Empty when the chunks are not encrypted.
	Keys   []WrappedKey  `json:"keys,omitempty"`
	Images []PackedImage `json:"images"`
	// Stored is the bytes on disk of every chunk the images reference; Written those this
	// checkpoint wrote itself (the rest it shares with older ones).
	Stored  int64 `json:"stored"`
	Written int64 `json:"written"`
}

// PackedImage is one CRIU image: its chunks in order (chunk i starts at the sum of the lengths of
// the chunks before it).
type PackedImage struct {
	Name   string     `json:"name"`
	Size   int64      `json:"size"`
	Chunks []ChunkRef `json:"chunks"`
}

// ChunkRef is one chunk of an image.
type ChunkRef struct {
	// Name is the hex keyed hash of the plaintext (Pack.Naming); empty for a chunk of zeros
	// (not stored).
	Name string `json:"n,omitempty"`
	Len  int    `json:"l"`
	// Key indexes Pack.Keys (the data key that encrypts the chunk); -1: not encrypted.
	Key int `json:"k,omitempty"`
	// Pack, Off and Stored locate the chunk's record: pack file <Pack>.pack, Stored bytes at Off.
	Pack   string `json:"p,omitempty"`
	Off    int64  `json:"o,omitempty"`
	Stored int64  `json:"s,omitempty"`
}

func (p *Pack) keyID(i int) string {
	if i < 0 || i >= len(p.Keys) {
		return plainID
	}
	return p.Keys[i].ID
}

const plainID = "plain"

// packFile is the name of pack file id in the chunk store.
func packFile(id string) string { return id + packSuffix }

const packSuffix = ".pack"

// validPackID: 16 hex digits.
func validPackID(id string) bool { return validKeyID(id) }

// sealLimit bounds the record sealChunk makes of n bytes (raw, header, nonce, tag).
func sealLimit(n int) int64 { return int64(n) + chunkHdrLen + gcmNonceSize + gcmOverhead }

// validate checks what a reader relies on before touching a chunk file.
func (p *Pack) validate() error {
	if p.Naming != namingHMAC && p.Naming != NamingBLAKE3 {
		return fmt.Errorf("pack: chunk naming %q unknown", p.Naming)
	}
	if p.ChunkSize <= 0 || p.ChunkSize > maxChunkSize {
		return fmt.Errorf("pack: chunk size %d out of range", p.ChunkSize)
	}
	seen := map[string]bool{}
	for _, img := range p.Images {
		if err := checkImageName(img.Name); err != nil || seen[img.Name] {
			return fmt.Errorf("pack: image name %q invalid or repeated", img.Name)
		}
		seen[img.Name] = true
		var total int64
		for i, c := range img.Chunks {
			if c.Len <= 0 || c.Len > p.ChunkSize {
				return fmt.Errorf("pack: image %s chunk %d: length %d out of range", img.Name, i, c.Len)
			}
			if c.Name != "" && !validChunkName(c.Name) {
				return fmt.Errorf("pack: image %s chunk %d: name %q is not 64 hex digits", img.Name, i, c.Name)
			}
			if c.Name != "" && !p.keyOK(c.Key) {
				return fmt.Errorf("pack: image %s chunk %d: key %d out of range", img.Name, i, c.Key)
			}
			if c.Name != "" && (!validPackID(c.Pack) || c.Off < 0 || c.Stored <= chunkHdrLen || c.Stored > sealLimit(c.Len)) {
				return fmt.Errorf("pack: image %s chunk %d: location %s@%d+%d invalid", img.Name, i, c.Pack, c.Off, c.Stored)
			}
			total += int64(c.Len)
		}
		if total != img.Size {
			return fmt.Errorf("pack: image %s: chunks hold %d bytes, size says %d", img.Name, total, img.Size)
		}
	}
	return nil
}

// keyOK: an encrypted pack names one of its keys, a plain one none.
func (p *Pack) keyOK(k int) bool {
	if len(p.Keys) == 0 {
		return k == -1
	}
	return k >= 0 && k < len(p.Keys)
}

func validChunkName(n string) bool {
	b, err := hex.DecodeString(n)
	return err == nil && len(b) == sha256.Size && hex.EncodeToString(b) == n
}

// checkImageName accepts a plain file name (CRIU's image names).
func checkImageName(n string) error {
	if n == "" || n == "." || n == ".." || len(n) > 255 || bytes.ContainsAny([]byte(n), "/\x00") {
		return fmt.Errorf("image name %q: not a plain file name", n)
	}
	return nil
}

// Chunk namings (Pack.Naming): keyed 256-bit hashes of a chunk's plaintext. Dumps write
// NamingBLAKE3: it costs 0.57 of HMAC-SHA256 (with SHA-NI) per byte on this VM, and every dump
// names every chunk it reads, changed or not (docs/agent.md, "Checkpoint store").
const (
	namingHMAC   = ""
	NamingBLAKE3 = "blake3"
)

// chunkNamer names chunks under one naming and its key.
type chunkNamer struct {
	naming string
	key    []byte
}

func (n chunkNamer) name(plain []byte) string {
	if n.naming == NamingBLAKE3 {
		h, err := blake3.NewKeyed(n.key)
		if err != nil {
			panic(err) // the key ring derives 32-byte keys
		}
		_, _ = h.Write(plain)
		return hex.EncodeToString(h.Sum(nil))
	}
	mac := hmac.New(sha256.New, n.key)
	mac.Write(plain)
	return hex.EncodeToString(mac.Sum(nil))
}

func allZero(b []byte) bool {
	// Compare 4 KiB at a time against a zero page: memequal is vectorised.
	for len(b) >= len(zeroPage) {
		if !bytes.Equal(b[:len(zeroPage)], zeroPage[:]) {
			return false
		}
		b = b[len(zeroPage):]
	}
	return bytes.Equal(b, zeroPage[:len(b)])
}

var zeroPage [4096]byte

// The chunk file:
//
//	0  "STCK"    magic
//	4  1         version
//	5  codec     Codec of the payload
//	6  flags     1: encrypted
//	7  0         reserved
//	8  length    uint32 little endian: the plaintext's length
//	12 nonce     12 bytes, when encrypted
//	   payload   AES-256-GCM(data key, compressed plaintext, AD = header ‖ name ‖ key id), or
//	             the compressed plaintext itself when not encrypted
const (
	chunkMagic   = "STCK"
	chunkHdrLen  = 12
	flagEncrypt  = 1
	gcmNonceSize = 12
	gcmOverhead  = 16
)

// minSaving: a chunk is stored raw unless compression saves at least a tenth.
const minSaving = 10

var (
	zstdEnc  *zstd.Encoder
	zstdDec  *zstd.Decoder
	zstdOnce sync.Once
)

func zstdCodecs() (*zstd.Encoder, *zstd.Decoder) {
	zstdOnce.Do(func() {
		zstdEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
		zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderMaxWindow(maxChunkSize))
	})
	return zstdEnc, zstdDec
}

// compress appends plain compressed with c to dst, or plain itself with CodecRaw when that does
// not save minSaving %.
func compress(c Codec, dst, plain []byte) ([]byte, Codec) {
	start := len(dst)
	switch c {
	case CodecS2:
		need := s2.MaxEncodedLen(len(plain))
		if cap(dst)-start < need {
			dst = append(dst[:start:start], make([]byte, need)...)[:start]
		}
		enc := s2.Encode(dst[start:start+need], plain)
		dst = dst[:start+len(enc)]
	case CodecZstd:
		enc, _ := zstdCodecs()
		dst = enc.EncodeAll(plain, dst)
	default:
		return append(dst, plain...), CodecRaw
	}
	if len(dst)-start > len(plain)*(100-minSaving)/100 {
		return append(dst[:start], plain...), CodecRaw
	}
	return dst, c
}

// decompress decodes payload of codec c, which must give exactly n bytes.
func decompress(c Codec, payload []byte, n int) ([]byte, error) {
	switch c {
	case CodecRaw:
		if len(payload) != n {
			return nil, fmt.Errorf("raw payload of %d bytes, want %d", len(payload), n)
		}
		return payload, nil
	case CodecS2:
		if dl, err := s2.DecodedLen(payload); err != nil || dl != n {
			return nil, fmt.Errorf("s2 payload does not decode to %d bytes", n)
		}
		return s2.Decode(make([]byte, n), payload)
	case CodecZstd:
		_, dec := zstdCodecs()
		out, err := dec.DecodeAll(payload, make([]byte, 0, n))
		if err != nil || len(out) != n {
			return nil, errors.Join(err, fmt.Errorf("zstd payload does not decode to %d bytes", n))
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown codec %d", c)
}

func chunkAD(hdr []byte, name, keyID string) []byte {
	ad := make([]byte, 0, len(hdr)+len(name)+1+len(keyID))
	ad = append(ad, hdr...)
	ad = append(ad, name...)
	ad = append(ad, 0)
	return append(ad, keyID...)
}

// sealChunk builds the chunk file of plain (named name) into buf: compressed with c, encrypted
// with dk when dk is not nil.
func sealChunk(buf []byte, c Codec, dk *dataKey, name string, plain []byte) []byte {
	var hdr [chunkHdrLen]byte
	copy(hdr[:], chunkMagic)
	hdr[4] = 1
	binary.LittleEndian.PutUint32(hdr[8:], uint32(len(plain)))
	if dk == nil {
		out := append(buf[:0], hdr[:]...)
		out, used := compress(c, out, plain)
		out[5] = byte(used)
		return out
	}
	// Compress into a scratch area past the header and nonce, then seal in place.
	body := buf[:0]
	body = append(body, hdr[:]...)
	body = append(body, make([]byte, gcmNonceSize)...)
	comp, used := compress(c, body, plain)
	comp[5] = byte(used)
	comp[6] = flagEncrypt
	nonce := comp[chunkHdrLen : chunkHdrLen+gcmNonceSize]
	_, _ = rand.Read(nonce)
	ad := chunkAD(comp[:chunkHdrLen], name, dk.id)
	payload := comp[chunkHdrLen+gcmNonceSize:]
	sealed := dk.aead.Seal(payload[:0], nonce, payload, ad)
	return comp[:chunkHdrLen+gcmNonceSize+len(sealed)]
}

// openChunk checks and decodes a chunk file: decrypted with dk (nil: not encrypted),
// decompressed, and its name under namer must be name. Only then is the plaintext returned.
func openChunk(file []byte, dk *dataKey, namer chunkNamer, name string, n int) ([]byte, error) {
	if len(file) < chunkHdrLen || string(file[:4]) != chunkMagic || file[4] != 1 {
		return nil, errors.New("not a chunk file (bad header)")
	}
	if got := int(binary.LittleEndian.Uint32(file[8:])); got != n {
		return nil, fmt.Errorf("chunk holds %d bytes, the manifest says %d", got, n)
	}
	codec := Codec(file[5])
	payload := file[chunkHdrLen:]
	if enc := file[6]&flagEncrypt != 0; enc != (dk != nil) {
		return nil, errors.New("chunk encryption does not match the manifest")
	}
	if dk != nil {
		if len(payload) < gcmNonceSize+gcmOverhead {
			return nil, errors.New("chunk too short")
		}
		nonce, sealed := payload[:gcmNonceSize], payload[gcmNonceSize:]
		var err error
		// In place: file is the reader's own copy of the record.
		payload, err = dk.aead.Open(sealed[:0], nonce, sealed, chunkAD(file[:chunkHdrLen], name, dk.id))
		if err != nil {
			return nil, errors.New("chunk fails authentication (altered, or another chunk)")
		}
	}
	plain, err := decompress(codec, payload, n)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal([]byte(namer.name(plain)), []byte(name)) {
		return nil, errors.New("chunk content does not match its name (altered)")
	}
	return plain, nil
}
