package schedule

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Recipient is one row of a recipient source: the address and the data
// the templates see.
type Recipient struct {
	Address string
	Data    map[string]any
}

// Source lists a fire's recipients in a stable order, resumably: Open
// starts after a cursor that an earlier Reader returned ("" is the start).
type Source interface {
	Open(ctx context.Context, cursor string) (Reader, error)
	// String describes the source for logs and errors.
	String() string
}

// Reader reads a source in batches.
type Reader interface {
	// Next returns up to n recipients and the cursor after them, or io.EOF
	// when there are no more.
	Next(ctx context.Context, n int) ([]Recipient, string, error)
	Close() error
}

// addressOf finds the address among a row's fields: "email", else
// "address" (any case).
func addressOf(data map[string]any) (string, bool) {
	for _, want := range []string{"email", "address"} {
		for k, v := range data {
			if strings.EqualFold(k, want) {
				s, ok := v.(string)
				return s, ok
			}
		}
	}
	return "", false
}

// ---- files: CSV (with a header row) or JSON Lines ----

// FileSource reads a CSV file with a header row (one column named email or
// address; every column is template data) or a JSON Lines file (one object
// per line, with an "email" or "address" member). The cursor is the row
// number and byte offset after the last row returned, so a resumed fire
// seeks instead of re-reading.
type FileSource struct {
	Path string
	CSV  bool // false: JSON Lines
}

// NewFileSource chooses the format by extension: .csv is CSV, .jsonl,
// .ndjson and .json are JSON Lines.
func NewFileSource(path string) (*FileSource, error) {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".csv":
		return &FileSource{Path: path, CSV: true}, nil
	case ".jsonl", ".ndjson", ".json":
		return &FileSource{Path: path}, nil
	}
	return nil, fmt.Errorf("%q: unknown file type; name it .csv (with a header row) or .jsonl (one JSON object per line)", path)
}

func (f *FileSource) String() string { return "file " + f.Path }

func parseFileCursor(c string) (row, off int64, err error) {
	if c == "" {
		return 0, 0, nil
	}
	r, o, ok := strings.Cut(c, "@")
	row, err1 := strconv.ParseInt(r, 10, 64)
	off, err2 := strconv.ParseInt(o, 10, 64)
	if !ok || err1 != nil || err2 != nil || row < 0 || off < 0 {
		return 0, 0, fmt.Errorf("cursor %q is not ROW@OFFSET", c)
	}
	return row, off, nil
}

// Open opens the file at the cursor.
func (f *FileSource) Open(ctx context.Context, cursor string) (Reader, error) {
	row, off, err := parseFileCursor(cursor)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f, err)
	}
	fh, err := os.Open(f.Path)
	if err != nil {
		return nil, fmt.Errorf("recipients %w", err)
	}
	r := &fileReader{src: f, f: fh, row: row, off: off}
	if f.CSV {
		// The header is always the first record; the data resumes at off.
		cr := csv.NewReader(bufio.NewReader(fh))
		cr.ReuseRecord = false
		hdr, err := cr.Read()
		if err != nil {
			fh.Close()
			return nil, fmt.Errorf("recipients %s: read the header row: %w", f.Path, err)
		}
		r.header = hdr
		found := false
		for _, h := range hdr {
			if strings.EqualFold(h, "email") || strings.EqualFold(h, "address") {
				found = true
			}
		}
		if !found {
			fh.Close()
			return nil, fmt.Errorf("recipients %s: the header row %q has no email or address column", f.Path, strings.Join(hdr, ","))
		}
		if off == 0 {
			r.off = cr.InputOffset()
		}
	}
	if _, err := fh.Seek(r.off, io.SeekStart); err != nil {
		fh.Close()
		return nil, fmt.Errorf("recipients %s: seek to %d: %w", f.Path, r.off, err)
	}
	r.br = bufio.NewReaderSize(fh, 64<<10)
	if f.CSV {
		r.cr = csv.NewReader(r.br)
		r.cr.FieldsPerRecord = len(r.header)
		r.base = r.off
	}
	return r, nil
}

type fileReader struct {
	src    *FileSource
	f      *os.File
	br     *bufio.Reader
	cr     *csv.Reader
	header []string
	base   int64 // file offset where cr started
	row    int64 // data rows before the next one
	off    int64 // file offset of the next row
}

func (r *fileReader) Next(ctx context.Context, n int) ([]Recipient, string, error) {
	var out []Recipient
	for len(out) < n {
		var data map[string]any
		if r.cr != nil {
			rec, err := r.cr.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, "", fmt.Errorf("recipients %s: data row %d: %w", r.src.Path, r.row+1, err)
			}
			data = make(map[string]any, len(rec))
			for i, h := range r.header {
				data[h] = rec[i]
			}
			r.off = r.base + r.cr.InputOffset()
		} else {
			line, err := r.br.ReadBytes('\n')
			if len(line) == 0 && err == io.EOF {
				break
			}
			if err != nil && err != io.EOF {
				return nil, "", fmt.Errorf("recipients %s: %w", r.src.Path, err)
			}
			r.off += int64(len(line))
			line = bytes.TrimSpace(line)
			if len(line) == 0 {
				continue // blank lines do not count as rows
			}
			dec := json.NewDecoder(bytes.NewReader(line))
			dec.UseNumber()
			if err := dec.Decode(&data); err != nil {
				return nil, "", fmt.Errorf("recipients %s: row %d (at byte %d): not a JSON object: %w", r.src.Path, r.row+1, r.off-int64(len(line)), err)
			}
		}
		r.row++
		addr, ok := addressOf(data)
		if !ok {
			return nil, "", fmt.Errorf("recipients %s: row %d has no email or address field", r.src.Path, r.row)
		}
		out = append(out, Recipient{Address: addr, Data: data})
	}
	if len(out) == 0 {
		return nil, "", io.EOF
	}
	return out, fmt.Sprintf("%d@%d", r.row, r.off), nil
}

func (r *fileReader) Close() error { return r.f.Close() }

// ---- HTTP: JSON Lines from an endpoint ----

// HTTPSource fetches JSON Lines (one object per line, with an "email" or
// "address" member) from a URL with GET. The endpoint must return the
// same rows in the same order for one fire: the cursor is the number of
// rows already taken, and a resumed fire skips that many.
type HTTPSource struct {
	URL     string
	Client  *http.Client
	Headers map[string]string
}

func (h *HTTPSource) String() string { return "http " + h.URL }

// Open requests the URL and skips the rows before the cursor.
func (h *HTTPSource) Open(ctx context.Context, cursor string) (Reader, error) {
	var skip int64
	if cursor != "" {
		var err error
		if skip, err = strconv.ParseInt(cursor, 10, 64); err != nil || skip < 0 {
			return nil, fmt.Errorf("%s: cursor %q is not a row count", h, cursor)
		}
	}
	client := h.Client
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Minute}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.URL, nil)
	if err != nil {
		return nil, fmt.Errorf("recipients %s: %w", h.URL, err)
	}
	req.Header.Set("Accept", "application/x-ndjson, application/jsonl, application/json")
	for k, v := range h.Headers {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("recipients %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("recipients %s: %s: %s", h.URL, resp.Status, strings.TrimSpace(string(b)))
	}
	r := &httpReader{src: h, body: resp.Body, br: bufio.NewReaderSize(resp.Body, 64<<10)}
	for r.row < skip {
		line, err := r.br.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			r.row++
		}
		if err != nil {
			if err == io.EOF {
				break
			}
			r.Close()
			return nil, fmt.Errorf("recipients %s: %w", h.URL, err)
		}
	}
	return r, nil
}

type httpReader struct {
	src  *HTTPSource
	body io.Closer
	br   *bufio.Reader
	row  int64
}

func (r *httpReader) Next(ctx context.Context, n int) ([]Recipient, string, error) {
	var out []Recipient
	for len(out) < n {
		if err := ctx.Err(); err != nil {
			return nil, "", err
		}
		line, err := r.br.ReadBytes('\n')
		if len(line) == 0 && err == io.EOF {
			break
		}
		if err != nil && err != io.EOF {
			return nil, "", fmt.Errorf("recipients %s: after row %d: %w", r.src.URL, r.row, err)
		}
		line = bytes.TrimSpace(line)
		if len(line) == 0 {
			continue
		}
		var data map[string]any
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber()
		if err := dec.Decode(&data); err != nil {
			return nil, "", fmt.Errorf("recipients %s: row %d: not a JSON object: %w", r.src.URL, r.row+1, err)
		}
		r.row++
		addr, ok := addressOf(data)
		if !ok {
			return nil, "", fmt.Errorf("recipients %s: row %d has no email or address field", r.src.URL, r.row)
		}
		out = append(out, Recipient{Address: addr, Data: data})
	}
	if len(out) == 0 {
		return nil, "", io.EOF
	}
	return out, strconv.FormatInt(r.row, 10), nil
}

func (r *httpReader) Close() error { return r.body.Close() }

// ---- PostgreSQL: a query ----

// SQLSource runs a query on PostgreSQL; each row is a recipient, with a
// column named email or address, and every column is template data. The
// query must order its rows stably (ORDER BY a unique key): the cursor is
// the number of rows taken, and a resumed fire continues with OFFSET.
type SQLSource struct {
	URL   string
	Query string
}

func (s *SQLSource) String() string { return "sql query" }

// Open runs the query from the cursor's row on.
func (s *SQLSource) Open(ctx context.Context, cursor string) (Reader, error) {
	var skip int64
	if cursor != "" {
		var err error
		if skip, err = strconv.ParseInt(cursor, 10, 64); err != nil || skip < 0 {
			return nil, fmt.Errorf("recipients sql: cursor %q is not a row count", cursor)
		}
	}
	conn, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		return nil, fmt.Errorf("recipients sql: connect: %w", err)
	}
	rows, err := conn.Query(ctx, "SELECT * FROM ("+strings.TrimRight(strings.TrimSpace(s.Query), ";")+") AS recipients OFFSET $1", skip)
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("recipients sql: %w", err)
	}
	return &sqlReader{conn: conn, rows: rows, row: skip}, nil
}

type sqlReader struct {
	conn *pgx.Conn
	rows pgx.Rows
	row  int64
	done bool
}

func (r *sqlReader) Next(ctx context.Context, n int) ([]Recipient, string, error) {
	var out []Recipient
	for !r.done && len(out) < n {
		if !r.rows.Next() {
			r.done = true
			if err := r.rows.Err(); err != nil {
				return nil, "", fmt.Errorf("recipients sql: after row %d: %w", r.row, err)
			}
			break
		}
		vals, err := r.rows.Values()
		if err != nil {
			return nil, "", fmt.Errorf("recipients sql: row %d: %w", r.row+1, err)
		}
		data := make(map[string]any, len(vals))
		for i, fd := range r.rows.FieldDescriptions() {
			data[fd.Name] = vals[i]
		}
		r.row++
		addr, ok := addressOf(data)
		if !ok {
			return nil, "", fmt.Errorf("recipients sql: row %d has no text column named email or address", r.row)
		}
		out = append(out, Recipient{Address: addr, Data: data})
	}
	if len(out) == 0 {
		return nil, "", io.EOF
	}
	return out, strconv.FormatInt(r.row, 10), nil
}

func (r *sqlReader) Close() error {
	r.rows.Close()
	return r.conn.Close(context.Background())
}
